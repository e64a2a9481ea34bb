# Checks that every ```cpp block of a Markdown document appears verbatim in a C++ source file, so
# that the snippets of a guide are compiled (the source is built as an example) and cannot drift.
#
#   cmake -DDOC=docs/usage.md -DSOURCE=examples/usage_snippets.cpp -P tests/docs_snippets_test.cmake
#   (SOURCE may name several files separated by '|'; each block must occur in one of them)
#
# A block is the text between a line starting with ```cpp (or ```c++) and the next line starting
# with ```, without the fences; it must occur in SOURCE as one contiguous, character-for-character
# substring (line endings are compared as \n). Blocks fenced with any other language (```sh, ```text,
# a bare ```) are skipped. Fences must start at the beginning of a line: an indented fence is
# reported as an error rather than silently skipped.
#
# The whole text is handled with string() operations only, never as a CMake list, so semicolons and
# square brackets in C++ code are safe.

cmake_minimum_required(VERSION 3.25)

foreach(variable IN ITEMS DOC SOURCE)
  if(NOT DEFINED ${variable} OR "${${variable}}" STREQUAL "")
    message(FATAL_ERROR "docs_snippets_test: pass -D${variable}=<path> "
                        "(usage: cmake -DDOC=<guide.md> -DSOURCE=<snippets.cpp> -P ${CMAKE_CURRENT_LIST_FILE})")
  endif()
  string(REPLACE "|" ";" paths "${${variable}}")
  foreach(path IN LISTS paths)
    if(NOT EXISTS "${path}")
      message(FATAL_ERROR "docs_snippets_test: ${variable} file '${path}' does not exist")
    endif()
  endforeach()
endforeach()

file(READ "${DOC}" doc_text)
# SOURCE may list several files separated by '|': a block must occur in one of them.
string(REPLACE "|" ";" source_files "${SOURCE}")
set(source_text "")
foreach(source_file IN LISTS source_files)
  file(READ "${source_file}" one_source)
  string(APPEND source_text "${one_source}\n")
endforeach()
string(REPLACE "\r\n" "\n" doc_text "${doc_text}")
string(REPLACE "\r\n" "\n" source_text "${source_text}")

# Fences inside a list item or a quote would be indented; this script does not strip indentation.
string(REGEX MATCH "\n[ \t>]+```[^\n]*" indented_fence "\n${doc_text}")
if(indented_fence)
  string(STRIP "${indented_fence}" indented_fence)
  message(FATAL_ERROR "docs_snippets_test: ${DOC} has an indented code fence ('${indented_fence}'); "
                      "put fences at the start of a line")
endif()

# Returns the first `count` lines of `text`, for messages.
function(first_lines text count out_var)
  set(rest "${text}")
  set(shown "")
  foreach(unused RANGE 1 ${count})
    string(FIND "${rest}" "\n" newline)
    if(newline EQUAL -1)
      string(APPEND shown "    ${rest}\n")
      set(rest "")
      break()
    endif()
    string(SUBSTRING "${rest}" 0 ${newline} line)
    string(APPEND shown "    ${line}\n")
    math(EXPR after "${newline} + 1")
    string(SUBSTRING "${rest}" ${after} -1 rest)
    if(rest STREQUAL "")
      break()
    endif()
  endforeach()
  set(${out_var} "${shown}" PARENT_SCOPE)
endfunction()

# Returns the 1-based line number of character `position` of `text`.
function(line_number_at text position out_var)
  string(SUBSTRING "${text}" 0 ${position} before)
  string(REGEX REPLACE "[^\n]" "" newlines "${before}")
  string(LENGTH "${newlines}" count)
  math(EXPR line "${count} + 1")
  set(${out_var} ${line} PARENT_SCOPE)
endfunction()

# `text` starts with "\n" so that a fence on the first line is found like any other; positions in it
# are one past positions in the file, and a line's "\n" comes before it.
set(text "\n${doc_text}")
string(LENGTH "${text}" text_length)
set(position 0)
set(checked 0)
set(missing 0)
set(report "")

while(TRUE)
  string(SUBSTRING "${text}" ${position} -1 rest)
  string(FIND "${rest}" "\n```" open_offset)
  if(open_offset EQUAL -1)
    break()
  endif()
  math(EXPR fence_start "${position} + ${open_offset} + 1")  # the first backtick
  string(SUBSTRING "${text}" ${fence_start} -1 rest)
  string(FIND "${rest}" "\n" info_end)
  if(info_end EQUAL -1)
    line_number_at("${text}" ${fence_start} fence_line)
    math(EXPR fence_line "${fence_line} - 1")
    message(FATAL_ERROR "docs_snippets_test: ${DOC}:${fence_line}: a code block is opened and "
                        "never closed")
  endif()
  math(EXPR info_length "${info_end} - 3")
  string(SUBSTRING "${rest}" 3 ${info_length} info)
  string(STRIP "${info}" info)
  string(TOLOWER "${info}" info)
  # The language is the first word of the info string ("cpp", "cpp title=x" ...).
  string(REGEX REPLACE "[ \t{].*$" "" language "${info}")

  math(EXPR body_start "${fence_start} + ${info_end} + 1")
  if(body_start GREATER text_length)
    set(body_start ${text_length})
  endif()
  # The closing fence: the next line that starts with ```. An empty block closes at once.
  string(SUBSTRING "${text}" ${body_start} -1 body_rest)
  if(body_rest MATCHES "^```")
    set(close_offset 0)
    set(body "")
  else()
    string(FIND "${body_rest}" "\n```" close_offset)
    if(close_offset EQUAL -1)
      line_number_at("${text}" ${fence_start} fence_line)
      math(EXPR fence_line "${fence_line} - 1")
      message(FATAL_ERROR "docs_snippets_test: ${DOC}:${fence_line}: the code block opened here is "
                          "never closed")
    endif()
    string(SUBSTRING "${body_rest}" 0 ${close_offset} body)
    math(EXPR close_offset "${close_offset} + 1")
  endif()
  # Continue after the closing fence's line.
  math(EXPR closing_fence "${body_start} + ${close_offset}")
  string(SUBSTRING "${text}" ${closing_fence} -1 after_close)
  string(FIND "${after_close}" "\n" close_line_end)
  if(close_line_end EQUAL -1)
    set(position ${text_length})
  else()
    math(EXPR position "${closing_fence} + ${close_line_end}")
  endif()

  if(NOT (language STREQUAL "cpp" OR language STREQUAL "c++"))
    continue()
  endif()

  math(EXPR checked "${checked} + 1")
  string(FIND "${source_text}" "${body}" found)
  if(found EQUAL -1)
    math(EXPR missing "${missing} + 1")
    line_number_at("${text}" ${fence_start} fence_line)
    math(EXPR fence_line "${fence_line} - 1")
    first_lines("${body}" 3 shown)
    string(APPEND report
           "block ${checked} (${DOC}:${fence_line}) does not appear verbatim in ${SOURCE}; it starts:\n"
           "${shown}")
  endif()
  if(position GREATER_EQUAL text_length)
    break()
  endif()
endwhile()

if(checked EQUAL 0)
  message(FATAL_ERROR "docs_snippets_test: ${DOC} has no ```cpp block: wrong file?")
endif()
if(missing GREATER 0)
  message(FATAL_ERROR "docs_snippets_test: ${missing} of ${checked} cpp blocks of ${DOC} are not in "
                      "${SOURCE} (copy each block into it character for character, and keep it "
                      "compiling):\n${report}")
endif()
message(STATUS "docs_snippets_test: all ${checked} cpp blocks of ${DOC} appear verbatim in ${SOURCE}")

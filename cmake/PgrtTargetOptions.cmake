# Compiler options shared by every pgrt target. They are applied privately (never exported), so a
# consumer of the installed package does not inherit our warning or sanitizer flags.

add_library(pgrt_build_options INTERFACE)
target_compile_options(
  pgrt_build_options
  INTERFACE -Wall
            -Wextra
            -Wpedantic
            -Wshadow
            -Wold-style-cast
            -Wcast-align
            -Woverloaded-virtual
            -Wnull-dereference
            -Wimplicit-fallthrough
            # g++ < 14 warns about members left out of a designated initializer, which is exactly
            # how pgrt's option aggregates are meant to be used.
            -Wno-missing-field-initializers
            # At -O2, g++ 12 inlines deep into Asio's scheduler and reports null dereferences
            # that cannot happen (io_context.hpp, scheduler.ipp); Debug builds keep the check.
            $<$<NOT:$<CONFIG:Debug>>:-Wno-null-dereference>
            # At -O2, g++ 12 also takes Asio's coroutine frame allocator (aligned_alloc, freed by
            # the frame's own operator delete through the same recycling allocator) for a mismatch.
            $<$<AND:$<CXX_COMPILER_ID:GNU>,$<NOT:$<CONFIG:Debug>>>:-Wno-mismatched-new-delete>)
# A unity build (CMAKE_UNITY_BUILD, on in the sanitizer presets: docs/development.md) compiles
# several sources as one file; g++ then takes the types with internal linkage of every source but
# the first for a header's, and warns that a type with linkage uses them (-Wsubobject-linkage).
if(CMAKE_UNITY_BUILD AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  target_compile_options(pgrt_build_options INTERFACE -Wno-subobject-linkage)
endif()
if(PGRT_WARNINGS_AS_ERRORS)
  target_compile_options(pgrt_build_options INTERFACE -Werror)
endif()

if(PGRT_SANITIZERS)
  target_compile_options(pgrt_build_options INTERFACE -fsanitize=${PGRT_SANITIZERS}
                                                      -fno-omit-frame-pointer)
  if(PGRT_SANITIZERS MATCHES "thread")
    # Asio's fenced blocks use atomic_thread_fence, which g++ warns TSan does not model.
    target_compile_options(pgrt_build_options INTERFACE -Wno-tsan)
  endif()
  target_link_options(pgrt_build_options INTERFACE -fsanitize=${PGRT_SANITIZERS})
endif()

# pgrt_apply_build_options(<target>...): warnings (and sanitizers) for code we own.
function(pgrt_apply_build_options)
  foreach(target IN LISTS ARGN)
    target_link_libraries(${target} PRIVATE $<BUILD_INTERFACE:pgrt_build_options>)
  endforeach()
endfunction()

# pgrt_add_library(<name> EXPORT_NAME <n> HEADERS <h>... SOURCES <s>... [LINK <dep>...]):
# a pgrt layer library with public headers under include/, exported as pgrt::<n>.
function(pgrt_add_library name)
  cmake_parse_arguments(arg "" "EXPORT_NAME" "HEADERS;SOURCES;LINK" ${ARGN})
  add_library(${name} ${arg_SOURCES})
  add_library(pgrt::${arg_EXPORT_NAME} ALIAS ${name})
  target_sources(
    ${name}
    PUBLIC FILE_SET
           HEADERS
           BASE_DIRS
           ${CMAKE_CURRENT_SOURCE_DIR}/include
           FILES
           ${arg_HEADERS})
  target_link_libraries(${name} PUBLIC ${arg_LINK})
  target_compile_features(${name} PUBLIC cxx_std_20)
  set_target_properties(
    ${name}
    PROPERTIES EXPORT_NAME ${arg_EXPORT_NAME}
               POSITION_INDEPENDENT_CODE ON
               # Each public header must compile on its own: CMake generates one translation
               # unit per header (target <name>_verify_interface_header_sets).
               VERIFY_INTERFACE_HEADER_SETS ON)
  pgrt_apply_build_options(${name})
endfunction()

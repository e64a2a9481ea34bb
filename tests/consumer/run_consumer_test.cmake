# Installs the built project into a fresh prefix, then configures, builds and runs the consumer
# project against it. Invoked by ctest (pgrt_install_consumer).
foreach(var PGRT_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer_test.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Debug)
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")

function(run_step description)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${description} failed (${result}):\n${out}")
  endif()
  message(STATUS "${description}: ok")
endfunction()

run_step("install into ${prefix}" ${CMAKE_COMMAND} --install "${PGRT_BUILD_DIR}" --prefix
         "${prefix}" --config ${CONFIG})
# A sanitized static library needs the sanitizer runtime in the program that links it.
set(sanitizer_flags "")
if(SANITIZERS)
  set(sanitizer_flags "-fsanitize=${SANITIZERS}")
endif()
run_step("configure the consumer" ${CMAKE_COMMAND} -S "${CONSUMER_SOURCE_DIR}" -B
         "${WORK_DIR}/build" -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=${CONFIG}
         "-DCMAKE_CXX_FLAGS=${sanitizer_flags}")
run_step("build the consumer" ${CMAKE_COMMAND} --build "${WORK_DIR}/build")
run_step("run the consumer" "${WORK_DIR}/build/pgrt_consumer")
# Its tests: a throwaway cluster (plain and TLS), PgBouncer and the fault proxy, from the package.
run_step("run the consumer's tests" "${WORK_DIR}/build/pgrt_consumer_tests" --gtest_color=no)
file(REMOVE_RECURSE "${WORK_DIR}")

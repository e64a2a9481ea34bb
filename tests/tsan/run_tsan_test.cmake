# Builds the pool's integration tests with ThreadSanitizer in a build tree of their own and runs
# the multi-threaded ones (a 2-thread io_context under load; close() interrupting leases held on
# another thread). Invoked by ctest (pgrt_pool_tsan); the tree is kept, so reruns are incremental.
foreach(var SOURCE_DIR WORK_DIR FILTER)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_tsan_test.cmake: ${var} is not set")
  endif()
endforeach()

function(run_step description)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${description} failed (${result}):\n${out}")
  endif()
  message(STATUS "${description}: ok")
endfunction()

run_step("configure a ThreadSanitizer build in ${WORK_DIR}" ${CMAKE_COMMAND} -S "${SOURCE_DIR}"
         -B "${WORK_DIR}" -DCMAKE_BUILD_TYPE=Debug -DPGRT_SANITIZERS=thread
         -DPGRT_WARNINGS_AS_ERRORS=ON -DPGRT_TSAN_TEST=OFF)
run_step("build pgrt_pool_pgtests with ThreadSanitizer" ${CMAKE_COMMAND} --build "${WORK_DIR}"
         --target pgrt_pool_pgtests -j2)
set(ENV{TSAN_OPTIONS} "halt_on_error=1:second_deadlock_stack=1")
execute_process(COMMAND "${WORK_DIR}/tests/pgrt_pool_pgtests" "--gtest_filter=${FILTER}"
                RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT result EQUAL 0)
  message(FATAL_ERROR "pgrt_pool_pgtests under ThreadSanitizer failed (${result})")
endif()

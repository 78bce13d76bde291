# cmake -DMESON=<meson> -DSOURCE_DIR=<dir with meson.build> -DBUILD_DIR=<dir> -P RunMesonConsumer.cmake
# Sets up, builds and runs the Meson consumer from scratch; fails at the first failing step.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "failed (${result}): ${ARGN}")
  endif()
endfunction()

file(REMOVE_RECURSE "${BUILD_DIR}")
run("${MESON}" setup "${BUILD_DIR}" "${SOURCE_DIR}")
run("${MESON}" compile -C "${BUILD_DIR}")
run("${BUILD_DIR}/consumer")

# cmake -DREADME=<README.md> -DEXAMPLE=<file.cpp> -P CheckReadmeSnippet.cmake
# Fails unless the lines between the two "// [readme]" markers of EXAMPLE appear verbatim in README.
file(READ "${EXAMPLE}" _example)
file(READ "${README}" _readme)
string(REGEX MATCH "// \\[readme\\]\n(.*)\n[ ]*// \\[readme\\]" _ "${_example}")
set(_snippet "${CMAKE_MATCH_1}")
if(_snippet STREQUAL "")
  message(FATAL_ERROR "${EXAMPLE} has no region between two // [readme] markers")
endif()
string(FIND "${_readme}" "${_snippet}" _at)
if(_at EQUAL -1)
  message(FATAL_ERROR "README.md does not contain the marked region of ${EXAMPLE}:\n${_snippet}")
endif()
message(STATUS "README.md shows ${EXAMPLE} word for word")

# cmake -DREADME=<README.md> -DEXAMPLES=<examples dir> -P CheckReadmeSnippets.cmake
#
# Every ```cpp block of README must be, word for word, one region between two "// [readme]"
# marker lines of a file in EXAMPLES (any number of regions per file). The examples are compiled
# with the project's warnings and run by ctest, so every C++ line a user copies from the README
# has been built and run. Indentation: each block and each region is compared after removing its
# first line's indentation from every line (a region inside a function body is indented, the
# README block is not). Fails naming the first block that matches no region.
#
# Only string(FIND/SUBSTRING/REPLACE) below: C++ text is full of ';', which CMake lists would split.

# _dedent(<text> <out>): removes the indentation of the first line from the start of every line.
function(_dedent text out)
  string(REGEX MATCH "^[ ]+" _indent "${text}")
  if(NOT _indent STREQUAL "")
    string(LENGTH "${_indent}" _width)
    string(SUBSTRING "${text}" ${_width} -1 text)
    string(REPLACE "\n${_indent}" "\n" text "${text}")
  endif()
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

# Every marked region of the examples, each framed as "\n@@region\n<text>\n@@end\n".
set(_regions "")
set(_region_count 0)
file(GLOB _sources "${EXAMPLES}/*.cpp")
foreach(_source IN LISTS _sources)
  file(READ "${_source}" _text)
  string(FIND "${_text}" "// [readme]\n" _open)
  while(NOT _open EQUAL -1)
    math(EXPR _begin "${_open} + 12")
    string(SUBSTRING "${_text}" ${_begin} -1 _text)
    string(FIND "${_text}" "// [readme]\n" _close)
    if(_close EQUAL -1)
      message(FATAL_ERROR "${_source}: a // [readme] marker without its closing marker")
    endif()
    string(SUBSTRING "${_text}" 0 ${_close} _region)
    # Drop the closing marker's own indentation and the newline before it.
    string(REGEX REPLACE "\n[ ]*$" "" _region "${_region}")
    _dedent("${_region}" _region)
    string(APPEND _regions "\n@@region\n${_region}\n@@end\n")
    math(EXPR _region_count "${_region_count} + 1")
    math(EXPR _after "${_close} + 12")
    string(SUBSTRING "${_text}" ${_after} -1 _text)
    string(FIND "${_text}" "// [readme]\n" _open)
  endwhile()
endforeach()

file(READ "${README}" _readme)
set(_blocks 0)
string(FIND "${_readme}" "```cpp\n" _open)
while(NOT _open EQUAL -1)
  math(EXPR _begin "${_open} + 7")
  string(SUBSTRING "${_readme}" ${_begin} -1 _readme)
  string(FIND "${_readme}" "\n```" _close)
  if(_close EQUAL -1)
    message(FATAL_ERROR "README.md: a ```cpp block is not closed")
  endif()
  string(SUBSTRING "${_readme}" 0 ${_close} _block)
  math(EXPR _after "${_close} + 4")
  string(SUBSTRING "${_readme}" ${_after} -1 _readme)
  math(EXPR _blocks "${_blocks} + 1")
  _dedent("${_block}" _block)
  string(FIND "${_regions}" "\n@@region\n${_block}\n@@end\n" _at)
  if(_at EQUAL -1)
    message(FATAL_ERROR
      "README.md's C++ block ${_blocks} is not a // [readme] region of any file in ${EXAMPLES} "
      "(change the README and its source together):\n${_block}")
  endif()
  string(FIND "${_readme}" "```cpp\n" _open)
endwhile()
if(_blocks EQUAL 0)
  message(FATAL_ERROR "README.md has no ```cpp block: is this the right README?")
endif()
message(STATUS "README.md: all ${_blocks} C++ blocks are regions of the compiled examples "
               "(${_region_count} regions)")

# `cmake --build <dir> --target docs`: the API reference from the /// comments, warnings as errors.
set(DOXYGEN_PROJECT_NAME blockattn)
set(DOXYGEN_OUTPUT_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}/docs")
set(DOXYGEN_EXTRACT_ALL NO)
# Every public entity carries its one-line contract: an undocumented one fails the build.
set(DOXYGEN_WARN_IF_UNDOCUMENTED YES)
set(DOXYGEN_WARN_AS_ERROR YES)
set(DOXYGEN_EXCLUDE_PATTERNS "*/detail/*")
# Internals (no promises to users): the detail/ headers and every detail namespace, at any depth
# (the wildcards also cover one nested in an inline namespace, e.g. an ISA-tagged one).
set(DOXYGEN_EXCLUDE_SYMBOLS "blockattn::detail" "blockattn::detail::*" "blockattn::reference::detail"
  "blockattn::reference::detail::*" "blockattn::distributed::detail"
  "blockattn::distributed::detail::*" "*::detail" "*::detail::*")
set(DOXYGEN_GENERATE_LATEX NO)
set(DOXYGEN_USE_MDFILE_AS_MAINPAGE "${CMAKE_CURRENT_SOURCE_DIR}/README.md")
doxygen_add_docs(docs "${CMAKE_CURRENT_SOURCE_DIR}/include/blockattn" "${CMAKE_CURRENT_SOURCE_DIR}/README.md"
  COMMENT "API reference into ${CMAKE_CURRENT_BINARY_DIR}/docs")

# The reference must keep building without warnings: a ~1 s test, only where Doxygen is found.
if(BLOCKATTN_BUILD_TESTS)
  add_test(NAME docs_build_without_warnings
    COMMAND ${CMAKE_COMMAND} --build ${CMAKE_BINARY_DIR} --target docs)
endif()

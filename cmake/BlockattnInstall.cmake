# cmake --install: headers, the exported blockattn::blockattn target and a package config that
# find_package(blockattn CONFIG) reads.
include(CMakePackageConfigHelpers)

install(TARGETS blockattn EXPORT blockattnTargets)
if(TARGET blockattn_mpi)
  install(TARGETS blockattn_mpi EXPORT blockattnTargets)
endif()
install(DIRECTORY include/blockattn TYPE INCLUDE)

set(BLOCKATTN_CONFIG_DIR "${CMAKE_INSTALL_DATADIR}/cmake/blockattn")
install(EXPORT blockattnTargets NAMESPACE blockattn:: DESTINATION "${BLOCKATTN_CONFIG_DIR}")

configure_package_config_file(
  "${CMAKE_CURRENT_SOURCE_DIR}/cmake/blockattnConfig.cmake.in"
  "${CMAKE_CURRENT_BINARY_DIR}/blockattnConfig.cmake"
  INSTALL_DESTINATION "${BLOCKATTN_CONFIG_DIR}")
# SameMinorVersion while 0.x; a header-only package fits any architecture.
write_basic_package_version_file(
  "${CMAKE_CURRENT_BINARY_DIR}/blockattnConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES
  "${CMAKE_CURRENT_BINARY_DIR}/blockattnConfig.cmake"
  "${CMAKE_CURRENT_BINARY_DIR}/blockattnConfigVersion.cmake"
  DESTINATION "${BLOCKATTN_CONFIG_DIR}")

# cmake --install: headers, the exported blockattn::blockattn target and a package config that
# find_package(blockattn CONFIG) reads, and blockattn.pc for pkg-config users (Meson, Makefiles).
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

# pkg-config: arch-independent (DATADIR), with the prefix found from the .pc file's own directory
# so the install stays relocatable (cmake --install --prefix, a staged DESTDIR).
set(BLOCKATTN_PKGCONFIG_DIR "${CMAKE_INSTALL_DATADIR}/pkgconfig")
if(IS_ABSOLUTE "${BLOCKATTN_PKGCONFIG_DIR}")
  set(BLOCKATTN_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH _blockattn_pc_up "/prefix/${BLOCKATTN_PKGCONFIG_DIR}" "/prefix")
  string(REGEX REPLACE "/$" "" _blockattn_pc_up "${_blockattn_pc_up}")
  set(BLOCKATTN_PC_PREFIX "\${pcfiledir}/${_blockattn_pc_up}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(BLOCKATTN_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(BLOCKATTN_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file("${CMAKE_CURRENT_SOURCE_DIR}/cmake/blockattn.pc.in"
               "${CMAKE_CURRENT_BINARY_DIR}/blockattn.pc" @ONLY)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/blockattn.pc" DESTINATION "${BLOCKATTN_PKGCONFIG_DIR}")

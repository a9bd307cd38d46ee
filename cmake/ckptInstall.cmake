# Installs the library, its headers, the command-line tools and a package config
# so that a user's project does find_package(ckpt CONFIG) and links ckpt::ckpt.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(CKPT_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/ckpt")

install(TARGETS ckpt EXPORT ckptTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS ckpt-cli ckpt-writer RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# The local launcher, beside the CLI.
install(TARGETS ckpt-launch RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/ckpt" DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT ckptTargets NAMESPACE ckpt:: DESTINATION ${CKPT_CMAKE_DIR})

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/ckptConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/ckptConfig.cmake" INSTALL_DESTINATION ${CKPT_CMAKE_DIR})
write_basic_package_version_file("${PROJECT_BINARY_DIR}/ckptConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/ckptConfig.cmake" "${PROJECT_BINARY_DIR}/ckptConfigVersion.cmake"
  DESTINATION ${CKPT_CMAKE_DIR})

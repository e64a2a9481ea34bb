# Install and export the libraries so that find_package(pgrt CONFIG REQUIRED) works from the
# install tree. Only included when pgrt is the top-level project.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS pgrt-diag RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

install(
  TARGETS pgrt_runtime pgrt_db pgrt_lifecycle pgrt_service pgrt
  EXPORT pgrtTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  FILE_SET HEADERS
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(pgrt_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/pgrt)
install(
  EXPORT pgrtTargets
  NAMESPACE pgrt::
  DESTINATION ${pgrt_cmake_dir})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/pgrtConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/pgrtConfig.cmake INSTALL_DESTINATION ${pgrt_cmake_dir})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/pgrtConfigVersion.cmake
                                  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/pgrtConfig.cmake ${PROJECT_BINARY_DIR}/pgrtConfigVersion.cmake
        DESTINATION ${pgrt_cmake_dir})

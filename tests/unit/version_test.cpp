#include "pgrt/runtime/version.hpp"

#include <gtest/gtest.h>
#include <string>

#include "pgrt/db/libpq_info.hpp"

TEST(Version, HeaderConstantsMatchTheProjectVersion) {
  const std::string from_headers = std::to_string(pgrt::version_major) + "." +
                                   std::to_string(pgrt::version_minor) + "." +
                                   std::to_string(pgrt::version_patch);
  EXPECT_EQ(from_headers, PGRT_PROJECT_VERSION);
  EXPECT_EQ(pgrt::version_string(), PGRT_PROJECT_VERSION);
}

TEST(LibpqInfo, LinkedLibpqSupportsPipelineAndThreads) {
  EXPECT_GE(pgrt::libpq_version(), 140000) << "pipeline mode needs libpq 14 or later";
  EXPECT_TRUE(pgrt::libpq_is_thread_safe());
}

// How a child's command line is logged (internal; unit-tested).
#pragma once

#include <string>
#include <vector>

namespace pgrt::lifecycle::detail {

// `argv` joined by blanks as a child's start logs it, with what may be a password shown as "***"
// (docs/operations.md, "ChildProcess"). Linear in the length of the arguments: it runs on the
// io thread at each start.
std::string logged_command_line(const std::vector<std::string>& argv);

}  // namespace pgrt::lifecycle::detail

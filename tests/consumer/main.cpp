#include <iostream>

#include <pgrt/db/libpq_info.hpp>
#include <pgrt/lifecycle/state.hpp>
#include <pgrt/runtime/version.hpp>

int main() {
  std::cout << "pgrt " << pgrt::version_string() << ", libpq " << pgrt::libpq_version() << ", "
            << pgrt::lifecycle::to_string(pgrt::lifecycle::State::created) << '\n';
  return pgrt::version_string().empty() || pgrt::libpq_version() <= 0 ? 1 : 0;
}

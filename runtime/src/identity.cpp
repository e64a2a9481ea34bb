#include "pgrt/runtime/identity.hpp"

#include <array>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <random>
#include <unistd.h>

namespace pgrt {

namespace {

constexpr std::size_t max_tag_bytes = 63;
constexpr std::size_t incarnation_bytes = 8;

std::string read_boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

std::string read_host() {
  std::array<char, 256> name{};
  if (::gethostname(name.data(), name.size() - 1) != 0 || name[0] == '\0') return "unknown-host";
  return name.data();
}

std::string random_incarnation() {
  std::random_device device;
  std::array<char, incarnation_bytes + 1> text{};
  std::snprintf(text.data(), text.size(), "%08x", static_cast<unsigned>(device()));
  return text.data();
}

std::string sanitize(std::string_view text) {
  std::string clean;
  for (char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    clean += byte < 0x20 || byte > 0x7E || c == '/' ? '_' : c;
  }
  return clean;
}

// App and instance, shortened (longer first) so that the whole tag fits.
std::pair<std::string, std::string> fitted_names(std::string_view app, std::string_view instance) {
  std::string fitted_app = sanitize(app);
  std::string fitted_instance = sanitize(instance.empty() ? default_instance_name() : instance);
  while (fitted_app.size() + fitted_instance.size() + 2 + incarnation_bytes > max_tag_bytes) {
    if (fitted_app.size() >= fitted_instance.size()) {
      fitted_app.pop_back();
    } else {
      fitted_instance.pop_back();
    }
  }
  return {fitted_app, fitted_instance};
}

}  // namespace

const ProcessIdentity& process_identity() {
  static const ProcessIdentity identity{.host = read_host(),
                                        .pid = static_cast<int>(::getpid()),
                                        .boot_id = read_boot_id(),
                                        .started = std::chrono::system_clock::now(),
                                        .incarnation = random_incarnation()};
  return identity;
}

std::string describe_process_identity() {
  const auto& identity = process_identity();
  const std::time_t started = std::chrono::system_clock::to_time_t(identity.started);
  std::tm utc{};
  ::gmtime_r(&started, &utc);
  std::array<char, 32> when{};
  std::strftime(when.data(), when.size(), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return "host " + identity.host + ", pid " + std::to_string(identity.pid) + ", boot id " +
         (identity.boot_id.empty() ? "unknown" : identity.boot_id) + ", started " + when.data() +
         ", incarnation " + identity.incarnation;
}

std::string default_instance_name() {
  std::string name;
  for (char c : process_identity().host) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                       c == '.' || c == '-' || c == '_';
    name += plain ? c : '_';
    if (name.size() == 40) break;
  }
  return name.empty() ? "host" : name;
}

std::string make_connection_tag(std::string_view app, std::string_view instance) {
  auto [fitted_app, fitted_instance] = fitted_names(app, instance);
  return fitted_app + "/" + fitted_instance + "/" + process_identity().incarnation;
}

std::string connection_tag_prefix(std::string_view app, std::string_view instance) {
  auto [fitted_app, fitted_instance] = fitted_names(app, instance);
  return fitted_app + "/" + fitted_instance + "/";
}

}  // namespace pgrt

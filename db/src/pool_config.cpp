#include <cctype>
#include <charconv>
#include <cstdlib>
#include <optional>
#include <utility>

#include "pgrt/db/pool.hpp"

namespace pgrt {

namespace {

[[noreturn]] void invalid(std::string message, std::string hint = {}) {
  throw Error(make_error_code(client_errc::invalid_config),
              Diagnostics{.message = std::move(message), .hint = std::move(hint)});
}

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

std::uint64_t parse_number(const char* name, const std::string& text, std::uint64_t min,
                           std::uint64_t max) {
  std::uint64_t value = 0;
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || error != std::errc() || end != text.data() + text.size() || value < min ||
      value > max) {
    invalid(std::string(name) + "='" + text + "' is not valid",
            "expected a whole number from " + std::to_string(min) + " to " + std::to_string(max));
  }
  return value;
}

}  // namespace

PoolConfig PoolConfig::micro() {
  PoolConfig config;
  config.max_size = 3;
  config.min_idle = 0;
  config.max_waiters = 1'000;
  return config;
}

PoolConfig PoolConfig::small() {
  PoolConfig config;
  config.max_size = 10;
  config.min_idle = 1;
  return config;
}

PoolConfig PoolConfig::from_env() {
  return from_env(PoolConfig{});
}

PoolConfig PoolConfig::from_env(PoolConfig defaults) {
  PoolConfig config = std::move(defaults);
  if (auto preset = env("PGRT_POOL_PRESET")) {
    if (*preset == "micro") {
      config = micro();
    } else if (*preset == "small") {
      config = small();
    } else {
      invalid("PGRT_POOL_PRESET='" + *preset + "' is not valid", "expected 'micro' or 'small'");
    }
  }
  if (auto url = env("DATABASE_URL")) config.conninfo = *url;
  if (auto value = env("PGRT_POOL_MAX")) {
    config.max_size = parse_number("PGRT_POOL_MAX", *value, 1, 10'000);
  }
  if (auto value = env("PGRT_POOL_MIN_IDLE")) {
    config.min_idle = parse_number("PGRT_POOL_MIN_IDLE", *value, 0, 10'000);
  }
  if (auto value = env("PGRT_ACQUIRE_TIMEOUT_MS")) {
    config.acquire_timeout = std::chrono::milliseconds(
        parse_number("PGRT_ACQUIRE_TIMEOUT_MS", *value, 0, 24ULL * 3600 * 1000));
  }
  if (auto value = env("PGRT_MAX_LIFETIME_S")) {
    config.max_lifetime =
        std::chrono::seconds(parse_number("PGRT_MAX_LIFETIME_S", *value, 0, 365ULL * 24 * 3600));
  }
  if (auto value = env("PGRT_IDLE_TIMEOUT_S")) {
    config.idle_timeout =
        std::chrono::seconds(parse_number("PGRT_IDLE_TIMEOUT_S", *value, 0, 365ULL * 24 * 3600));
  }
  if (auto value = env("PGRT_LEAK_THRESHOLD_MS")) {
    config.leak_threshold = std::chrono::milliseconds(
        parse_number("PGRT_LEAK_THRESHOLD_MS", *value, 0, 24ULL * 3600 * 1000));
  }
  if (auto value = env("PGRT_POOL_RESET")) {
    if (*value == "rollback") {
      config.reset = ResetPolicy::rollback;
    } else if (*value == "discard_all") {
      config.reset = ResetPolicy::discard_all;
    } else {
      invalid("PGRT_POOL_RESET='" + *value + "' is not valid",
              "expected 'rollback' or 'discard_all'");
    }
  }
  if (auto value = env("PGRT_APP")) config.application = *value;
  if (auto value = env("PGRT_INSTANCE")) config.instance = *value;
  config.validate();
  return config;
}

void PoolConfig::validate() const {
  if (max_size == 0) invalid("max_size is 0", "a pool needs at least one connection");
  if (min_idle > max_size) {
    invalid("min_idle (" + std::to_string(min_idle) + ") exceeds max_size (" +
                std::to_string(max_size) + ")",
            "lower min_idle or raise max_size");
  }
  if (reserved_for_priority >= max_size) {
    invalid("reserved_for_priority (" + std::to_string(reserved_for_priority) +
                ") must be below max_size (" + std::to_string(max_size) + ")",
            "normal acquires need at least one connection");
  }
  if (lifetime_jitter < 0 || lifetime_jitter >= 1 || connect_backoff_jitter < 0 ||
      connect_backoff_jitter >= 1) {
    invalid("lifetime_jitter and connect_backoff_jitter must be in [0, 1)");
  }
  if (connect_backoff_initial.count() <= 0 || connect_backoff_max < connect_backoff_initial) {
    invalid("connect_backoff_initial must be positive and not above connect_backoff_max");
  }
  if (application.empty()) {
    invalid("application must not be empty",
            "it tags every connection's application_name (an empty instance means the host name)");
  }
}

}  // namespace pgrt

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <optional>
#include <ratio>
#include <spdlog/spdlog.h>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "budget_key.hpp"
#include "connection/conninfo.hpp"
#include "connection/options_check.hpp"
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

template <typename Rep, typename Period>
std::string show(std::chrono::duration<Rep, Period> value) {
  return detail::show_duration(value);
}

template <typename Rep, typename Period>
void require_within_a_year(std::string_view field, std::chrono::duration<Rep, Period> value,
                           std::string_view instead) {
  if (auto problem = detail::longer_than_a_year(field, value, instead)) {
    invalid(std::move(problem->message), std::move(problem->hint));
  }
}

// A duration that may be zero (with the meaning `zero_means`) but never negative, nor longer than
// a year.
template <typename Rep, typename Period>
void require_not_negative(std::string_view field, std::chrono::duration<Rep, Period> value,
                          std::string_view zero_means) {
  if (auto problem = detail::negative_or_too_long(field, value, zero_means)) {
    invalid(std::move(problem->message), std::move(problem->hint));
  }
}

// A name that fits in the PGRT_* lists: 1-63 printable characters, no spaces, ',' or ':'.
bool is_plain_name(const std::string& name) {
  return !name.empty() && name.size() <= 63 && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isgraph(static_cast<unsigned char>(c)) != 0 && c != ',' && c != ':';
  });
}

void check_consumers(const PoolConfig& config) {
  constexpr std::size_t most_consumers = 1'000;
  if (config.consumers.size() > most_consumers) {
    invalid("consumers lists " + std::to_string(config.consumers.size()) + " consumers",
            "at most " + std::to_string(most_consumers));
  }
  std::size_t minimums = 0;
  for (std::size_t i = 0; i < config.consumers.size(); ++i) {
    const ConsumerShare& consumer = config.consumers[i];
    const std::string which = "consumer '" + consumer.name + "'";
    if (!is_plain_name(consumer.name)) {
      invalid("consumers[" + std::to_string(i) + "] has the name '" + consumer.name + "'",
              "give each consumer a name of 1-63 printable characters, without spaces, ',' or "
              "':'");
    }
    if (consumer.name == "default") {
      // (The acquires that name no consumer are `default` in the stats and the metrics: a
      // consumer of that name would share their series.)
      invalid("consumers[" + std::to_string(i) + "] has the name 'default'",
              "'default' stands for the acquires that name no consumer: give this one another "
              "name");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (config.consumers[j].name == consumer.name) {
        invalid(which + " is listed twice", "give each consumer its own name");
      }
    }
    const std::size_t max = consumer.max == 0 ? config.max_size : consumer.max;
    if (max > config.max_size) {
      invalid(which + " has max " + std::to_string(max) + ", above the pool's max_size " +
                  std::to_string(config.max_size),
              "lower the consumer's max, or raise max_size");
    }
    if (consumer.min > max) {
      invalid(which + " has min " + std::to_string(consumer.min) + " above its max " +
                  std::to_string(max),
              "a consumer's min is at most its max");
    }
    minimums += consumer.min;
  }
  const std::size_t shared = config.max_size > config.reserved_for_priority
                                 ? config.max_size - config.reserved_for_priority
                                 : 0;
  if (minimums > shared) {
    invalid("the consumers' minimums add up to " + std::to_string(minimums) + ", more than the " +
                std::to_string(shared) + " connections max_size " +
                std::to_string(config.max_size) + " minus reserved_for_priority " +
                std::to_string(config.reserved_for_priority) + " leaves them",
            "lower the minimums, or raise max_size: every minimum must be possible at once");
  }
}

void check_budget_classes(const Budget& budget) {
  std::size_t classes_slots = 0;
  for (std::size_t i = 0; i < budget.classes.size(); ++i) {
    const Budget::Class& slot_class = budget.classes[i];
    if (!is_plain_name(slot_class.name)) {
      invalid("budget.classes[" + std::to_string(i) + "] has the name '" + slot_class.name + "'",
              "give each class a name of 1-63 printable characters, without spaces, ',' or ':'");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (budget.classes[j].name == slot_class.name) {
        invalid("the budget class '" + slot_class.name + "' is listed twice",
                "give each class its own name");
      }
    }
    if (slot_class.slots == 0) {
      invalid("the budget class '" + slot_class.name + "' has 0 slots", "give it at least 1");
    }
    // (Added up without wrapping around: each class within what the ones before it leave.)
    if (slot_class.slots > budget.slots - classes_slots) {
      const bool wraps = slot_class.slots > std::numeric_limits<std::size_t>::max() - classes_slots;
      invalid("the budget classes have " +
                  (wraps ? std::string("more than ") +
                               std::to_string(std::numeric_limits<std::size_t>::max())
                         : std::to_string(classes_slots + slot_class.slots)) +
                  " slots in all, more than the budget's " + std::to_string(budget.slots),
              "the classes' sizes add up to at most PGRT_BUDGET_SLOTS; the rest is shared");
    }
    classes_slots += slot_class.slots;
  }
  if (!budget.class_name.empty()) {
    const bool listed =
        std::any_of(budget.classes.begin(), budget.classes.end(),
                    [&](const Budget::Class& c) { return c.name == budget.class_name; });
    if (!listed) {
      invalid("the budget class '" + budget.class_name +
                  "' (PGRT_BUDGET_CLASS) is not listed in "
                  "budget.classes (PGRT_BUDGET_CLASSES)",
              "list it there, the same list in every process sharing the budget");
    }
  } else if (!budget.key.empty() && classes_slots == budget.slots && classes_slots > 0) {
    invalid("a pool without a budget class takes shared slots only, and the classes leave none",
            "set PGRT_BUDGET_CLASS, or leave some of PGRT_BUDGET_SLOTS to no class");
  }
}

// A PGRT_* list, "a:b,c:d": its comma-separated entries, each split at ':' into exactly
// `fields` parts (else invalid_config naming the variable, the entry and `form`).
std::vector<std::vector<std::string>> split_list(const char* variable, const std::string& text,
                                                 std::size_t fields, const std::string& form,
                                                 const std::string& expected) {
  std::vector<std::vector<std::string>> entries;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    const std::string entry = text.substr(start, end - start);
    std::vector<std::string> parts;
    for (std::size_t from = 0;;) {
      const std::size_t colon = std::min(entry.find(':', from), entry.size());
      parts.push_back(entry.substr(from, colon - from));
      if (colon == entry.size()) break;
      from = colon + 1;
    }
    if (parts.size() != fields) {
      invalid(std::string(variable) + "='" + text + "' is not valid: the entry '" + entry +
                  "' is not " + form,
              expected);
    }
    entries.push_back(std::move(parts));
    start = end + 1;
  }
  return entries;
}

// PGRT_BUDGET_CLASSES: "name:slots,name:slots".
std::vector<Budget::Class> parse_budget_classes(const std::string& text) {
  std::vector<Budget::Class> classes;
  for (const auto& entry :
       split_list("PGRT_BUDGET_CLASSES", text, 2, "name:slots",
                  "expected name:slots entries separated by commas, e.g. 'api:10,batch:30' (the "
                  "slots after the last class are shared)")) {
    classes.push_back(
        {.name = entry[0],
         .slots = parse_number("PGRT_BUDGET_CLASSES (a size)", entry[1], 1, 100'000)});
  }
  return classes;
}

// PGRT_POOL_CONSUMERS: "name:min:max,name:min:max".
std::vector<ConsumerShare> parse_consumers(const std::string& text) {
  std::vector<ConsumerShare> consumers;
  for (const auto& entry :
       split_list("PGRT_POOL_CONSUMERS", text, 3, "name:min:max",
                  "expected name:min:max entries separated by commas, e.g. "
                  "'scraper-a:1:2,scraper-b:1:2' (a max of 0 means the pool's max)")) {
    consumers.push_back({.name = entry[0],
                         .min = parse_number("PGRT_POOL_CONSUMERS (a min)", entry[1], 0, 10'000),
                         .max = parse_number("PGRT_POOL_CONSUMERS (a max)", entry[2], 0, 10'000)});
  }
  return consumers;
}

// Every check of validate(); `warn` logs the settings that are allowed but do not do what they
// seem to (from_env() leaves that to the Pool constructor, so one pool warns once).
void check(const PoolConfig& config, bool warn) {
  if (config.max_size == 0) invalid("max_size is 0", "a pool needs at least one connection");
  if (auto problem = conninfo_problem(config.conninfo); !problem.empty()) {
    invalid(problem,
            "use a URL (postgresql://user@host:5432/db) or key=value pairs "
            "(host=... dbname=...); DATABASE_URL sets it");
  }
  if (config.budget.key.empty() != (config.budget.slots == 0)) {
    invalid(
        config.budget.key.empty()
            ? "budget.slots is " + std::to_string(config.budget.slots) + " but budget.key is empty"
            : "budget.key is '" + config.budget.key + "' but budget.slots is 0",
        "set both (PGRT_BUDGET_KEY and PGRT_BUDGET_SLOTS), or neither for no budget");
  }
  require_not_negative("budget.check_interval", config.budget.check_interval,
                       "never checking that each connection still holds its slot");
  if (config.budget.check_interval.count() > 0 &&
      config.budget.check_interval < std::chrono::milliseconds(100)) {
    invalid("budget.check_interval is " + show(config.budget.check_interval),
            "at least 100 ms (one pg_locks query each time), or 0 to never check");
  }
  if (config.budget.key.empty() && config.budget.slots == 0 &&
      (!config.budget.classes.empty() || !config.budget.class_name.empty())) {
    invalid(
        "budget classes are given (budget.classes, budget.class_name: PGRT_BUDGET_CLASSES, "
        "PGRT_BUDGET_CLASS) but no budget to split (budget.key and budget.slots: "
        "PGRT_BUDGET_KEY and PGRT_BUDGET_SLOTS)",
        "set PGRT_BUDGET_KEY and PGRT_BUDGET_SLOTS as every process sharing the budget does, "
        "or leave the classes out for no budget");
  }
  if (const std::string problem = detail::budget_key_problem(config.budget.key); !problem.empty()) {
    invalid("budget.key '" + detail::shown_budget_key(config.budget.key) + "' (PGRT_BUDGET_KEY) " +
                problem,
            detail::budget_key_hint);
  }
  check_budget_classes(config.budget);
  for (const std::string_view marker_suffix :
       {std::string_view("/waiting"), std::string_view("/members")}) {
    if (config.budget.key.size() >= marker_suffix.size() &&
        config.budget.key.compare(config.budget.key.size() - marker_suffix.size(),
                                  marker_suffix.size(), marker_suffix) == 0) {
      invalid(
          "budget.key '" + config.budget.key + "' ends with '" + std::string(marker_suffix) + "'",
          "a budget's waiting and class membership markers use the names '/waiting' and "
          "'/members'; choose another key");
    }
  }
  if (config.budget.slots > 100'000) {
    invalid("budget.slots is " + std::to_string(config.budget.slots), "at most 100000");
  }
  if (!config.budget.key.empty() && config.connect.pooler == Pooler::transaction) {
    invalid(
        "a connection budget holds a session-level advisory lock per connection, and behind a "
        "transaction pooler (PGRT_POOLER=transaction) no session holds one",
        "give the budget a DSN straight to the server, or let the pooler bound the "
        "connections (PgBouncer: max_db_connections)");
  }
  check_consumers(config);
  if (config.connect.pooler == Pooler::transaction) {
    if (config.reset == ResetPolicy::discard_all) {
      invalid(
          "reset discard_all resets a server session, and behind a transaction pooler "
          "(PGRT_POOLER=transaction) the sessions are the pooler's",
          "use reset rollback (PGRT_POOL_RESET=rollback); the pooler resets sessions itself");
    }
    if (!config.connect.session_settings.empty()) {
      invalid(
          "connect.session_settings cannot be kept behind a transaction pooler "
          "(PGRT_POOLER=transaction): each transaction may run in another server session",
          "set them on the role or database (ALTER ROLE app SET ...)");
    }
  }
  if (config.min_idle > config.max_size) {
    invalid("min_idle (" + std::to_string(config.min_idle) + ") exceeds max_size (" +
                std::to_string(config.max_size) + ")",
            "lower min_idle or raise max_size");
  }
  if (!config.budget.key.empty()) {
    // What the pool can hold: its class's slots and the shared ones (those of no class), or the
    // shared ones alone without a class (check_budget_classes() has checked the classes).
    const Budget& budget = config.budget;
    std::size_t holdable = budget.slots;
    for (const Budget::Class& slot_class : budget.classes) holdable -= slot_class.slots;
    for (const Budget::Class& slot_class : budget.classes) {
      if (slot_class.name == budget.class_name) holdable += slot_class.slots;
    }
    if (config.min_idle > holdable) {
      invalid("min_idle (" + std::to_string(config.min_idle) + ") exceeds the " +
                  std::to_string(holdable) + " slots of the connection budget '" + budget.key +
                  "' that the pool can hold" +
                  (budget.classes.empty() ? std::string()
                   : budget.class_name.empty()
                       ? std::string(" (the shared ones: the pool has no class)")
                       : " (its class '" + budget.class_name + "' and the shared ones)"),
              "lower min_idle: the pool would ask for slots it can never hold, for good, and keep "
              "every process that shares the budget at its fair share");
    }
  }
  if (config.reserved_for_priority >= config.max_size) {
    invalid("reserved_for_priority (" + std::to_string(config.reserved_for_priority) +
                ") must be below max_size (" + std::to_string(config.max_size) + ")",
            "normal acquires need at least one connection");
  }
  // (Written so that NaN fails too.)
  if (!(config.lifetime_jitter >= 0 && config.lifetime_jitter < 1) ||
      !(config.connect_backoff_jitter >= 0 && config.connect_backoff_jitter < 1)) {
    invalid("lifetime_jitter and connect_backoff_jitter must be in [0, 1) (lifetime_jitter " +
            std::to_string(config.lifetime_jitter) + ", connect_backoff_jitter " +
            std::to_string(config.connect_backoff_jitter) + ")");
  }

  require_not_negative("acquire_timeout", config.acquire_timeout,
                       "failing at once when every connection is in use");
  require_not_negative("max_lifetime", config.max_lifetime, "no lifetime limit");
  require_not_negative("idle_timeout", config.idle_timeout, "never closing idle connections");
  require_not_negative("keepalive_interval", config.keepalive_interval, "no pings while idle");
  require_not_negative("validate_after_idle", config.validate_after_idle,
                       "no ping before handing out an idle connection");
  require_not_negative("leak_threshold", config.leak_threshold, "no leak reports");
  require_not_negative("fail_fast_after", config.fail_fast_after, "off");
  require_not_negative("watch_idle_after", config.watch_idle_after,
                       "never watching idle connections");
  if (config.connect_backoff_initial.count() <= 0) {
    invalid("connect_backoff_initial is " + show(config.connect_backoff_initial) +
                ", which is not positive",
            "give the first wait after a failed connect, e.g. 100 ms (the default)");
  }
  require_within_a_year("connect_backoff_max", config.connect_backoff_max, "");
  if (config.connect_backoff_max < config.connect_backoff_initial) {
    invalid("connect_backoff_max (" + show(config.connect_backoff_max) +
                ") is below connect_backoff_initial (" + show(config.connect_backoff_initial) + ")",
            "raise connect_backoff_max or lower connect_backoff_initial");
  }

  if (auto problem = detail::connect_options_problem(config.connect, "connect.")) {
    invalid(std::move(problem->message), std::move(problem->hint));
  }
  require_not_negative("guards.idle_in_transaction_timeout",
                       config.guards.idle_in_transaction_timeout, "turning this guard off");
  require_not_negative("guards.client_connection_check_interval",
                       config.guards.client_connection_check_interval, "turning this guard off");
  require_not_negative("guards.tcp_user_timeout", config.guards.tcp_user_timeout,
                       "turning this guard off");
  // (Server settings, and libpq's tcp_user_timeout: each an int of milliseconds.)
  for (const auto& [field, value, reader] :
       {std::tuple{"guards.idle_in_transaction_timeout", config.guards.idle_in_transaction_timeout,
                   "the server"},
        {"guards.client_connection_check_interval", config.guards.client_connection_check_interval,
         "the server"},
        {"guards.tcp_user_timeout", config.guards.tcp_user_timeout, "libpq"}}) {
    if (auto problem = detail::longer_than_int_milliseconds(field, value, reader)) {
      invalid(std::move(problem->message), std::move(problem->hint));
    }
  }

  if (config.application.empty()) {
    invalid("application must not be empty",
            "it tags every connection's application_name (an empty instance means the host name)");
  }

  if (warn && config.idle_timeout.count() > 0 && config.max_lifetime.count() > 0 &&
      config.idle_timeout >= config.max_lifetime) {
    spdlog::warn(
        "pgrt pool {}: idle_timeout ({}) is not below max_lifetime ({}): an idle connection "
        "reaches its lifetime first, so idle_timeout never applies; set idle_timeout below "
        "max_lifetime (or to 0 to turn it off and silence this warning)",
        config.application, show(config.idle_timeout), show(config.max_lifetime));
  }
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
  if (auto url = env("DATABASE_URL")) {
    // (Blanks only are as empty to libpq: " ", a secret file's lone newline.)
    if (url->find_first_not_of(" \t\r\n\f\v") == std::string::npos) {
      // (libpq would read an empty conninfo as "the PG* variables, else the local socket": a
      // template's unfilled secret would then start as against a server that is down.)
      invalid("DATABASE_URL is set but empty",
              "unset it to use libpq's PG* variables (PGHOST, PGDATABASE, ...), or give a URL "
              "(postgresql://user@host:5432/db) or key=value pairs (host=... dbname=...)");
    }
    config.conninfo = *url;
  }
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
  if (auto value = env("PGRT_FAIL_FAST_MS")) {
    config.fail_fast_after = std::chrono::milliseconds(
        parse_number("PGRT_FAIL_FAST_MS", *value, 0, 24ULL * 3600 * 1000));
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
  if (auto value = env("PGRT_POOL_TIMINGS")) {
    if (*value != "0" && *value != "1") {
      invalid("PGRT_POOL_TIMINGS='" + *value + "' is not valid",
              "expected 1 (record wait, use and statement times) or 0");
    }
    config.timings = *value == "1";
  }
  if (auto value = env("PGRT_RECHECK_SESSION_ATTRS")) {
    if (*value != "0" && *value != "1") {
      invalid("PGRT_RECHECK_SESSION_ATTRS='" + *value + "' is not valid",
              "expected 1 (close connections whose server no longer serves target_session_attrs) "
              "or 0");
    }
    config.recheck_session_attrs = *value == "1";
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
  if (auto value = env("PGRT_POOLER")) {
    if (*value == "none") {
      config.connect.pooler = Pooler::none;
    } else if (*value == "session") {
      config.connect.pooler = Pooler::session;
    } else if (*value == "transaction") {
      config.connect.pooler = Pooler::transaction;
    } else {
      invalid("PGRT_POOLER='" + *value + "' is not valid",
              "expected 'transaction' (a transaction-mode pooler such as PgBouncer's "
              "pool_mode=transaction), 'session' (a session-mode pooler) or 'none'");
    }
  }
  if (auto value = env("PGRT_BUDGET_KEY")) {
    if (const std::string problem = detail::budget_key_problem(*value); !problem.empty()) {
      invalid(
          "PGRT_BUDGET_KEY='" + detail::shown_budget_key(*value) + "' is not valid: it " + problem,
          detail::budget_key_hint);
    }
    config.budget.key = *value;
  }
  if (auto value = env("PGRT_BUDGET_SLOTS")) {
    config.budget.slots = parse_number("PGRT_BUDGET_SLOTS", *value, 1, 100'000);
  }
  if (auto value = env("PGRT_POOL_CONSUMERS")) {
    config.consumers = value->empty() ? std::vector<ConsumerShare>{} : parse_consumers(*value);
  }
  if (auto value = env("PGRT_BUDGET_CLASSES")) {
    config.budget.classes =
        value->empty() ? std::vector<Budget::Class>{} : parse_budget_classes(*value);
  }
  if (auto value = env("PGRT_BUDGET_CLASS")) config.budget.class_name = *value;
  if (auto value = env("PGRT_BUDGET_CHECK_MS")) {
    config.budget.check_interval = std::chrono::milliseconds(
        parse_number("PGRT_BUDGET_CHECK_MS", *value, 0, 24ULL * 3600 * 1000));
    if (config.budget.check_interval.count() > 0 &&
        config.budget.check_interval < std::chrono::milliseconds(100)) {
      invalid("PGRT_BUDGET_CHECK_MS='" + *value + "' is not valid",
              "expected 0 (never check) or a whole number of milliseconds from 100 (one pg_locks "
              "query each time) to " +
                  std::to_string(24ULL * 3600 * 1000));
    }
  }
  if (auto value = env("PGRT_APP")) {
    if (value->empty()) {
      invalid("PGRT_APP='' is not valid",
              "give the application's name (it tags every connection's application_name), or "
              "leave PGRT_APP unset for \"pgrt\"");
    }
    config.application = *value;
  }
  if (auto value = env("PGRT_INSTANCE")) config.instance = *value;
  check(config, false);
  return config;
}

void PoolConfig::validate() const {
  check(*this, true);
}

}  // namespace pgrt

// Pool: the public pool object, its stats and names. The work is the driver's (driver.hpp).
#include "driver.hpp"
#include "multiplexer.hpp"
#include "weak_pool.hpp"

namespace pgrt {

namespace asio = boost::asio;
using detail::Clock;
using detail::coarse_now;
using detail::throw_pool_error;

std::string_view to_string(DiscardReason reason) noexcept {
  switch (reason) {
    case DiscardReason::broken:
      return "broken";
    case DiscardReason::lifetime:
      return "lifetime";
    case DiscardReason::idle_timeout:
      return "idle_timeout";
    case DiscardReason::failed_reset:
      return "failed_reset";
    case DiscardReason::mid_query:
      return "mid_query";
    case DiscardReason::closing:
      return "closing";
    case DiscardReason::by_user:
      return "by_user";
    case DiscardReason::rejected:
      return "rejected";
    case DiscardReason::evicted:
      return "evicted";
    case DiscardReason::slot_lost:
      return "slot_lost";
    case DiscardReason::budget_share:
      return "budget_share";
    case DiscardReason::server_role:
      return "server_role";
  }
  return "unknown";
}

std::string_view to_string(ResetPolicy policy) noexcept {
  switch (policy) {
    case ResetPolicy::rollback:
      return "rollback";
    case ResetPolicy::discard_all:
      return "discard_all";
  }
  return "unknown";
}

std::string PoolStats::to_json() const {
  // A string as JSON: quotes and backslashes escaped, control characters as spaces, and bytes
  // that are not UTF-8 (a server's message in its own encoding, LATIN1 say) as U+FFFD, so that
  // the object stays valid JSON whatever the message holds.
  const auto quoted = [](std::string_view text) {
    std::string escaped = "\"";
    for (std::size_t at = 0; at < text.size();) {
      const auto c = static_cast<unsigned char>(text[at]);
      if (c < 0x80) {
        if (c == '"' || c == '\\') escaped += '\\';
        escaped += c < 0x20 ? ' ' : static_cast<char>(c);
        ++at;
        continue;
      }
      // The length of a well-formed sequence starting here (RFC 3629), 0 for none.
      const std::size_t length = c >= 0xC2 && c <= 0xDF   ? 2
                                 : c >= 0xE0 && c <= 0xEF ? 3
                                 : c >= 0xF0 && c <= 0xF4 ? 4
                                                          : 0;
      bool valid = length != 0 && at + length <= text.size();
      for (std::size_t i = 1; valid && i < length; ++i) {
        valid = (static_cast<unsigned char>(text[at + i]) & 0xC0U) == 0x80U;
      }
      if (valid) {  // no overlong form, surrogate, or code point past U+10FFFF
        const auto second = static_cast<unsigned char>(text[at + 1]);
        valid = !(c == 0xE0 && second < 0xA0) && !(c == 0xED && second > 0x9F) &&
                !(c == 0xF0 && second < 0x90) && !(c == 0xF4 && second > 0x8F);
      }
      if (valid) {
        escaped.append(text.substr(at, length));
        at += length;
      } else {
        escaped += "\\ufffd";
        ++at;
      }
    }
    return escaped + "\"";
  };
  auto field = [](const char* name, auto value) {
    return std::string("\"") + name + "\":" + std::to_string(value);
  };
  const auto histogram = [&field](const char* name, const DurationHistogram& times) {
    std::string counts;
    for (std::uint64_t count : times.counts) {
      counts += (counts.empty() ? "" : ",") + std::to_string(count);
    }
    return std::string("\"") + name + "\":{" + field("count", times.count) + "," +
           field("sum_ns", times.sum.count()) + ",\"counts\":[" + counts + "]}";
  };
  std::string consumer_list;
  for (const Consumer& consumer : consumers) {
    consumer_list += std::string(consumer_list.empty() ? "" : ",") +
                     "{\"name\":" + quoted(consumer.name) + "," + field("in_use", consumer.in_use) +
                     "," + field("waiting", consumer.waiting) + "," + field("min", consumer.min) +
                     "," + field("max", consumer.max) + "," + field("share", consumer.share) + "}";
  }
  std::string by_reason;
  for (std::size_t reason = 0; reason < discard_reason_count; ++reason) {
    by_reason += std::string(by_reason.empty() ? "" : ",") +
                 quoted(to_string(static_cast<DiscardReason>(reason))) + ":" +
                 std::to_string(discarded_by_reason[reason]);
  }
  const std::string error_code =
      last_connect_error_code
          ? "{\"category\":" + quoted(last_connect_error_code.category().name()) + "," +
                field("value", last_connect_error_code.value()) +
                ",\"message\":" + quoted(last_connect_error_code.message()) + "}"
          : "null";
  return "{" + field("max", max) + "," + field("size", size) + "," + field("idle", idle) + "," +
         field("in_use", in_use) + "," + field("connecting", connecting) + "," +
         field("closing", closing) + "," + field("resetting", resetting) + "," +
         field("pinging", pinging) + "," + field("shared_queued", shared_queued) + "," +
         field("shared_in_flight", shared_in_flight) + "," +
         field("shared_connections", shared_connections) + "," +
         field("waiting_normal", waiting_normal) + "," + field("waiting_high", waiting_high) + "," +
         field("acquired", acquired) + "," + field("timeouts", timeouts) + "," +
         field("cancellations", cancellations) + "," + field("connect_attempts", connect_attempts) +
         "," + field("connect_errors", connect_errors) + "," + field("discarded", discarded) + "," +
         field("leaks_suspected", leaks_suspected) + "," + field("wait_p50_us", wait_p50.count()) +
         "," + field("wait_p99_us", wait_p99.count()) + "," +
         field("wait_max_us", wait_max.count()) + "," +
         field("longest_wait_us", longest_wait.count()) + "," +
         field("leases_past_leak_threshold", leases_past_leak_threshold) + "," +
         field("min_idle", min_idle) + ",\"discarded_by_reason\":{" + by_reason + "}," +
         histogram("wait_time", wait_time) + "," + histogram("use_time", use_time) + "," +
         histogram("create_time", create_time) + "," + histogram("operation_time", operation_time) +
         "," + field("consecutive_connect_failures", consecutive_connect_failures) + "," +
         field("connect_backoff_ms", connect_backoff.count()) + "," +
         field("budget_probes", budget_probes) + "," +
         field("budget_probes_without_slot", budget_probes_without_slot) + "," +
         field("budget_slot_waits", budget_slot_waits) + ",\"consumers\":[" + consumer_list +
         "],\"last_connect_error\":" + quoted(last_connect_error) +
         ",\"last_connect_error_code\":" + error_code + "}";
}

// --- Pool ----------------------------------------------------------------------------------------

Pool::Pool(boost::asio::any_io_executor executor, PoolConfig config) : Pool(std::move(config)) {
  std::lock_guard lock(state_->mutex);
  state_->bind_executor_locked(executor);
}

Pool::Pool(PoolConfig config) {
  config.validate();
  state_ = std::make_shared<detail::PoolState>(std::move(config));
}

Pool::~Pool() {
  try {
    state_->begin_close();
  } catch (const std::exception& error) {
    spdlog::error("pgrt pool {}: closing failed: {}", state_->application_name, error.what());
  }
}

asio::awaitable<Lease> Pool::acquire(Priority priority, std::source_location site) {
  // Not a coroutine itself: the state's acquire is the one frame, and it keeps the state alive.
  return state_->acquire(state_, priority, detail::pool::default_consumer, site);
}

asio::awaitable<Lease> Pool::acquire(std::string_view consumer, Priority priority,
                                     std::source_location site) {
  // The name is looked up here, before any coroutine starts, so the caller's string need not
  // outlive the call.
  const auto index = state_->find_consumer(consumer);
  if (!index) return state_->fail_unknown_consumer(consumer);
  return state_->acquire(state_, priority, *index, site);
}

asio::awaitable<Result> Pool::query_with(std::string sql, ParamSink params) {
  // Not a coroutine itself: run_shared()'s frame holds the state.
  return detail::run_shared(
      state_, std::make_shared<detail::SharedStatement>(std::move(sql), std::move(params)));
}

namespace detail {

std::weak_ptr<PoolState> pool_state_of(Pool& pool) noexcept {
  return pool.state_;
}

asio::awaitable<Lease> acquire_from(const std::shared_ptr<PoolState>& state, Priority priority,
                                    std::source_location site) {
  // (As Pool::acquire(): the state's acquire is the one frame, and it keeps the state alive.)
  return state->acquire(state, priority, pool::default_consumer, site);
}

std::shared_ptr<Multiplexer> PoolState::multiplexer_for(const asio::any_io_executor& caller) {
  std::lock_guard lock(mutex);
  if (core.closed()) {
    throw_pool_error(client_errc::pool_closed, "the pool " + application_name + " is closed");
  }
  if (!executor) bind_executor_locked(caller);
  if (!multiplexer) multiplexer = std::make_shared<Multiplexer>(shared_from_this(), *executor);
  return multiplexer;
}

}  // namespace detail

void Pool::evict_all() {
  state_->evict_all();
}

PoolStats Pool::stats() const {
  return state_->stats();
}
PoolEvents& Pool::events() noexcept {
  return state_->events;
}
const PoolConfig& Pool::config() const noexcept {
  return state_->config;
}
const std::string& Pool::application_name() const noexcept {
  return state_->application_name;
}

}  // namespace pgrt

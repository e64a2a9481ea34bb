// Pool: the public pool object, its stats and names. The work is the driver's (driver.hpp).
#include "driver.hpp"
#include "multiplexer.hpp"

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
  const auto quoted = [](const std::string& text) {
    std::string escaped = "\"";
    for (char c : text) {
      if (c == '"' || c == '\\') {
        escaped += '\\';
        escaped += c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        escaped += ' ';
      } else {
        escaped += c;
      }
    }
    return escaped + "\"";
  };
  auto field = [](const char* name, auto value) {
    return std::string("\"") + name + "\":" + std::to_string(value);
  };
  std::string consumer_list;
  for (const Consumer& consumer : consumers) {
    consumer_list += std::string(consumer_list.empty() ? "" : ",") +
                     "{\"name\":" + quoted(consumer.name) + "," + field("in_use", consumer.in_use) +
                     "," + field("waiting", consumer.waiting) + "," + field("min", consumer.min) +
                     "," + field("max", consumer.max) + "," + field("share", consumer.share) + "}";
  }
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
         field("consecutive_connect_failures", consecutive_connect_failures) + "," +
         field("connect_backoff_ms", connect_backoff.count()) + "," +
         field("budget_probes", budget_probes) + "," +
         field("budget_probes_without_slot", budget_probes_without_slot) + "," +
         field("budget_slot_waits", budget_slot_waits) + ",\"consumers\":[" + consumer_list +
         "],\"last_connect_error\":" + quoted(last_connect_error) + "}";
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

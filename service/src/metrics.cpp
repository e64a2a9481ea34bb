// Metrics in the Prometheus text exposition format (version 0.0.4).
#include "pgrt/service/metrics.hpp"

#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <set>
#include <string>
#include <utility>

#include "pgrt/service/watchdog.hpp"
#include "utf8_text.hpp"  // (db/src)

namespace pgrt {

namespace {

using Labels = std::vector<std::pair<std::string_view, std::string>>;

// A label value as the format wants it: valid UTF-8 (an invalid byte becomes U+FFFD: else
// Prometheus refuses the whole scrape), backslash, double quote and newline escaped.
std::string escaped(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (const char c : detail::valid_utf8(value)) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string number(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (std::isnan(value)) return "NaN";
  // The shortest form that reads back as the same double, in %g's style: le="0.1" and
  // le="0.0001" (not "1e-04"), as client libraries write them, so that series of several
  // exporters group by le.
  std::array<char, 32> text{};
  const auto written =
      std::to_chars(text.data(), text.data() + text.size(), value, std::chars_format::general);
  return std::string(text.data(), written.ptr);
}

std::string number(std::uint64_t value) {
  return std::to_string(value);
}

// `names` with the second and later of a repeated name made distinct ("orders/vm/1a2b3c4d#2"),
// in order: two pools with one application name (a primary and a replica), or two pending-writes
// queues left with the default name, would otherwise give duplicate series, and Prometheus keeps
// one of each pair without a word.
std::vector<std::string> distinct_names(std::vector<std::string> names) {
  std::set<std::string> taken(names.begin(), names.end());
  std::set<std::string> seen;
  for (auto& name : names) {
    if (seen.insert(name).second) continue;
    for (int copy = 2;; ++copy) {
      std::string candidate = name + "#" + std::to_string(copy);
      if (taken.insert(candidate).second) {
        name = std::move(candidate);
        seen.insert(name);
        break;
      }
    }
  }
  return names;
}

double seconds(std::chrono::nanoseconds duration) {
  return std::chrono::duration<double>(duration).count();
}

// Writes families: a family's HELP and TYPE once, then its samples.
class Writer {
 public:
  void family(std::string_view name, std::string_view type, std::string_view help) {
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }
  void sample(std::string_view name, const Labels& labels, const std::string& value) {
    out_ += name;
    if (!labels.empty()) {
      out_ += '{';
      bool first = true;
      for (const auto& [label, label_value] : labels) {
        if (!first) out_ += ',';
        first = false;
        out_ += label;
        out_ += "=\"";
        out_ += escaped(label_value);
        out_ += '"';
      }
      out_ += '}';
    }
    out_ += ' ';
    out_ += value;
    out_ += '\n';
  }
  void histogram(std::string_view name, Labels labels, const DurationHistogram& histogram) {
    const std::string bucket = std::string(name) + "_bucket";
    std::uint64_t cumulative = 0;
    labels.emplace_back("le", "");
    for (std::size_t i = 0; i < DurationHistogram::upper_bounds_seconds.size(); ++i) {
      cumulative += histogram.counts[i];
      labels.back().second = number(DurationHistogram::upper_bounds_seconds[i]);
      sample(bucket, labels, number(cumulative));
    }
    labels.back().second = "+Inf";
    sample(bucket, labels, number(histogram.count));
    labels.pop_back();
    sample(std::string(name) + "_sum", labels, number(seconds(histogram.sum)));
    sample(std::string(name) + "_count", labels, number(histogram.count));
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

// One family with one sample per pool.
template <typename Value>
void per_pool(Writer& writer, const std::vector<std::pair<std::string, PoolStats>>& pools,
              std::string_view name, std::string_view type, std::string_view help, Value value) {
  if (pools.empty()) return;
  writer.family(name, type, help);
  for (const auto& [pool_name, stats] : pools) {
    writer.sample(name, {{"db_client_connection_pool_name", pool_name}}, value(stats));
  }
}

void write_pools(Writer& w, const std::vector<std::pair<std::string, PoolStats>>& pools) {
  if (pools.empty()) return;
  constexpr std::string_view pool_label = "db_client_connection_pool_name";
  w.family("db_client_connection_count", "gauge",
           "Connections in the pool by state: idle, or used (leased).");
  for (const auto& [name, stats] : pools) {
    w.sample("db_client_connection_count", {{pool_label, name}, {"state", "idle"}},
             number(std::uint64_t{stats.idle}));
    w.sample("db_client_connection_count", {{pool_label, name}, {"state", "used"}},
             number(std::uint64_t{stats.in_use}));
  }
  const auto count = [](auto field) {
    return [field](const PoolStats& stats) { return number(std::uint64_t(stats.*field)); };
  };
  per_pool(w, pools, "db_client_connection_max", "gauge",
           "The most connections the pool opens (PoolConfig::max_size).", count(&PoolStats::max));
  per_pool(w, pools, "db_client_connection_idle_min", "gauge",
           "Connections kept open while idle (PoolConfig::min_idle).", count(&PoolStats::min_idle));
  per_pool(w, pools, "db_client_connection_pending_requests", "gauge",
           "Callers waiting for a connection, both priorities.", [](const PoolStats& stats) {
             return number(std::uint64_t{stats.waiting_normal + stats.waiting_high});
           });
  per_pool(w, pools, "db_client_connection_timeouts_total", "counter",
           "Acquires that timed out (or failed at once with acquire_timeout 0).",
           count(&PoolStats::timeouts));
  const std::array<std::pair<std::string_view, DurationHistogram PoolStats::*>, 4> histograms{{
      {"db_client_connection_create_time_seconds", &PoolStats::create_time},
      {"db_client_connection_wait_time_seconds", &PoolStats::wait_time},
      {"db_client_connection_use_time_seconds", &PoolStats::use_time},
      {"db_client_operation_duration_seconds", &PoolStats::operation_time},
  }};
  const std::array<std::string_view, 4> histogram_help{
      "Time it took to open a connection (successful connects, checks on connect included).",
      "Time an acquire waited for a connection (0 for those served at once).",
      "Time between an acquire's return and the end of its lease.",
      "Time a statement took on the pool's connections, from its send to its last result "
      "(the pool's own resets and pings included; not pipelines or COPY)."};
  for (std::size_t i = 0; i < histograms.size(); ++i) {
    w.family(histograms[i].first, "histogram", histogram_help[i]);
    for (const auto& [name, stats] : pools) {
      w.histogram(histograms[i].first, {{pool_label, name}}, stats.*histograms[i].second);
    }
  }

  w.family("pgrt_pool_connections", "gauge",
           "Connections counted against the max in the states db_client_connection_count does "
           "not show: connecting, resetting, pinging, closing.");
  for (const auto& [name, stats] : pools) {
    const std::array<std::pair<std::string_view, std::size_t>, 4> states{{
        {"connecting", stats.connecting},
        {"resetting", stats.resetting},
        {"pinging", stats.pinging},
        {"closing", stats.closing},
    }};
    for (const auto& [state, value] : states) {
      w.sample("pgrt_pool_connections", {{pool_label, name}, {"state", std::string(state)}},
               number(std::uint64_t{value}));
    }
  }
  w.family("pgrt_pool_discards_total", "counter", "Connections closed by the pool, by reason.");
  for (const auto& [name, stats] : pools) {
    for (std::size_t reason = 0; reason < discard_reason_count; ++reason) {
      w.sample("pgrt_pool_discards_total",
               {{pool_label, name},
                {"reason", std::string(to_string(static_cast<DiscardReason>(reason)))}},
               number(stats.discarded_by_reason[reason]));
    }
  }
  per_pool(w, pools, "pgrt_pool_acquires_total", "counter", "Leases handed out.",
           count(&PoolStats::acquired));
  w.family("pgrt_pool_shared_statements", "gauge",
           "Statements of Pool::query(): waiting for a shared connection (queued) and sent, not "
           "yet answered (in_flight).");
  for (const auto& [name, stats] : pools) {
    w.sample("pgrt_pool_shared_statements", {{pool_label, name}, {"state", "queued"}},
             number(std::uint64_t{stats.shared_queued}));
    w.sample("pgrt_pool_shared_statements", {{pool_label, name}, {"state", "in_flight"}},
             number(std::uint64_t{stats.shared_in_flight}));
  }
  per_pool(w, pools, "pgrt_pool_shared_connections", "gauge",
           "Connections lent to Pool::query() (also counted as used).",
           count(&PoolStats::shared_connections));
  per_pool(w, pools, "pgrt_pool_cancellations_total", "counter",
           "Acquires whose caller was cancelled while waiting.", count(&PoolStats::cancellations));
  per_pool(w, pools, "pgrt_pool_connect_attempts_total", "counter", "Connects started.",
           count(&PoolStats::connect_attempts));
  per_pool(w, pools, "pgrt_pool_connect_failures_total", "counter", "Connects that failed.",
           count(&PoolStats::connect_errors));
  per_pool(w, pools, "pgrt_pool_connect_failures_in_a_row", "gauge",
           "Connects that failed since the last one that worked.",
           count(&PoolStats::consecutive_connect_failures));
  per_pool(w, pools, "pgrt_pool_connect_backoff_seconds", "gauge",
           "How long the pool waits before its next connect because connects fail (0: none).",
           [](const PoolStats& stats) { return number(seconds(stats.connect_backoff)); });
  per_pool(w, pools, "pgrt_pool_leaks_suspected_total", "counter",
           "Leases reported as held past PoolConfig::leak_threshold.",
           count(&PoolStats::leaks_suspected));
  per_pool(w, pools, "pgrt_pool_leases_past_leak_threshold", "gauge",
           "Leases held now past PoolConfig::leak_threshold.",
           count(&PoolStats::leases_past_leak_threshold));
  per_pool(w, pools, "pgrt_pool_longest_wait_seconds", "gauge",
           "How long the caller waiting longest now has waited (0: nobody waits).",
           [](const PoolStats& stats) { return number(seconds(stats.longest_wait)); });
  per_pool(w, pools, "pgrt_pool_budget_probes_total", "counter",
           "Under a budget: connections opened to look for a free slot.",
           count(&PoolStats::budget_probes));
  per_pool(w, pools, "pgrt_pool_budget_probes_without_slot_total", "counter",
           "Under a budget: probes that found no slot free.",
           count(&PoolStats::budget_probes_without_slot));
  per_pool(w, pools, "pgrt_pool_budget_slot_waits_total", "counter",
           "Under a budget: connects that waited for a slot.",
           count(&PoolStats::budget_slot_waits));

  bool any_consumers = false;
  for (const auto& entry : pools) any_consumers = any_consumers || !entry.second.consumers.empty();
  if (!any_consumers) return;
  using Consumer = PoolStats::Consumer;
  const std::array<std::tuple<std::string_view, std::string_view, std::size_t Consumer::*>, 5>
      consumer_families{{
          {"pgrt_pool_consumer_in_use", "Leases a consumer holds.", &Consumer::in_use},
          {"pgrt_pool_consumer_waiting", "A consumer's callers waiting.", &Consumer::waiting},
          {"pgrt_pool_consumer_min", "A consumer's guaranteed leases (ConsumerShare::min).",
           &Consumer::min},
          {"pgrt_pool_consumer_max", "A consumer's most leases (ConsumerShare::max).",
           &Consumer::max},
          {"pgrt_pool_consumer_share",
           "The leases a consumer would hold if every active one kept "
           "asking (0 while it is idle).",
           &Consumer::share},
      }};
  for (const auto& [family, help, field] : consumer_families) {
    w.family(family, "gauge", help);
    for (const auto& [name, stats] : pools) {
      for (const Consumer& consumer : stats.consumers) {
        w.sample(family,
                 {{pool_label, name},
                  {"consumer", consumer.name.empty() ? std::string("default") : consumer.name}},
                 number(std::uint64_t{consumer.*field}));
      }
    }
  }
}

}  // namespace

void Metrics::add_pool(std::string name, std::function<PoolStats()> stats) {
  pools_.push_back({std::move(name), std::move(stats)});
}

void Metrics::add_pool(const Pool& pool) {
  add_pool(pool.application_name(), [&pool] { return pool.stats(); });
}

void Metrics::add_process_pool() {
  process_pool_ = true;
}

void Metrics::add_pending_writes(std::string name, const PendingWrites& writes) {
  pending_.push_back({std::move(name), &writes});
}

void Metrics::add_watchdog(const Watchdog& watchdog) {
  watchdog_ = &watchdog;
}

void Metrics::add_lifecycle(const lifecycle::Manager& manager) {
  manager_ = &manager;
}

std::vector<std::pair<std::string, PoolStats>> Metrics::pool_snapshots() const {
  std::vector<std::pair<std::string, PoolStats>> snapshots;
  if (process_pool_) {
    if (const auto pool = configured_pool()) {
      snapshots.emplace_back(pool->application_name(), pool->stats());
    }
  }
  for (const PoolSource& source : pools_) snapshots.emplace_back(source.name, source.stats());
  std::vector<std::string> names;
  for (const auto& [name, stats] : snapshots) names.push_back(name);
  names = distinct_names(std::move(names));
  for (std::size_t i = 0; i < snapshots.size(); ++i) snapshots[i].first = std::move(names[i]);
  return snapshots;
}

std::string Metrics::render() const {
  Writer w;
  write_pools(w, pool_snapshots());

  if (!pending_.empty()) {
    std::vector<PendingWritesReport> reports;
    reports.reserve(pending_.size());
    for (const PendingSource& source : pending_) reports.push_back(source.writes->report());
    const std::array<std::tuple<std::string_view, std::string_view, std::string_view,
                                std::uint64_t (*)(const PendingWritesReport&)>,
                     6>
        families{{
            {"pgrt_pending_writes_accepted_total", "counter", "Writes accepted.",
             [](const PendingWritesReport& r) { return r.accepted; }},
            {"pgrt_pending_writes_flushed_total", "counter", "Writes in a committed batch.",
             [](const PendingWritesReport& r) { return r.flushed; }},
            {"pgrt_pending_writes_failed_total", "counter", "Writes given up on.",
             [](const PendingWritesReport& r) { return r.failed; }},
            {"pgrt_pending_writes_unconfirmed_total", "counter",
             "Writes given up on whose batch's COMMIT went out unanswered: they may be stored "
             "(counted in failed too).",
             [](const PendingWritesReport& r) { return r.unconfirmed; }},
            {"pgrt_pending_writes_queued", "gauge", "Writes accepted and not flushed yet.",
             [](const PendingWritesReport& r) { return std::uint64_t{r.pending}; }},
            {"pgrt_pending_writes_waiting", "gauge", "Callers waiting for room in the queue.",
             [](const PendingWritesReport& r) { return std::uint64_t{r.waiting}; }},
        }};
    std::vector<std::string> names;
    for (const PendingSource& source : pending_) names.push_back(source.name);
    names = distinct_names(std::move(names));
    for (const auto& [family, type, help, read] : families) {
      w.family(family, type, help);
      for (std::size_t i = 0; i < pending_.size(); ++i) {
        w.sample(family, {{"pending_writes", names[i]}}, number(read(reports[i])));
      }
    }
  }

  if (watchdog_ != nullptr) {
    const auto holding = watchdog_->conditions();
    const auto warnings = watchdog_->warnings();
    w.family("pgrt_watchdog_condition", "gauge", "1 while a watchdog condition holds.");
    for (std::size_t i = 0; i < watchdog_condition_count; ++i) {
      w.sample("pgrt_watchdog_condition",
               {{"condition", std::string(to_string(static_cast<WatchdogCondition>(i)))}},
               holding[i] ? "1" : "0");
    }
    w.family("pgrt_watchdog_warnings_total", "counter", "Times a watchdog condition started.");
    for (std::size_t i = 0; i < watchdog_condition_count; ++i) {
      w.sample("pgrt_watchdog_warnings_total",
               {{"condition", std::string(to_string(static_cast<WatchdogCondition>(i)))}},
               number(warnings[i]));
    }
    w.family("pgrt_watchdog_checks_total", "counter", "Checks the watchdog ran.");
    w.sample("pgrt_watchdog_checks_total", {}, number(watchdog_->checks()));
  }

  if (manager_ != nullptr) {
    const lifecycle::State now = manager_->state();
    w.family("pgrt_lifecycle_state", "gauge", "1 for the lifecycle manager's current state.");
    for (lifecycle::State state :
         {lifecycle::State::created, lifecycle::State::starting, lifecycle::State::running,
          lifecycle::State::stopping, lifecycle::State::stopped, lifecycle::State::failed}) {
      w.sample("pgrt_lifecycle_state", {{"state", std::string(lifecycle::to_string(state))}},
               state == now ? "1" : "0");
    }
    w.family("pgrt_lifecycle_ready", "gauge",
             "1 while the process is ready (started, no shutdown begun).");
    w.sample("pgrt_lifecycle_ready", {}, manager_->ready() ? "1" : "0");
  }
  return w.take();
}

std::optional<std::string> Metrics::stuck(std::chrono::milliseconds after) const {
  for (const auto& [name, stats] : pool_snapshots()) {
    if (stats.longest_wait > after) {
      return "pool " + name + ": a caller has waited " +
             std::to_string(
                 std::chrono::duration_cast<std::chrono::milliseconds>(stats.longest_wait)
                     .count()) +
             " ms for a connection (more than " + std::to_string(after.count()) + " ms); " +
             std::to_string(stats.in_use) + " of max " + std::to_string(stats.max) + " in use, " +
             std::to_string(stats.waiting_normal + stats.waiting_high) + " waiting";
    }
  }
  return std::nullopt;
}

}  // namespace pgrt

#include "name_lookup.hpp"

#include <algorithm>
#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <netdb.h>
#include <optional>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <system_error>
#include <thread>
#include <unistd.h>
#include <unordered_map>
#include <utility>

namespace pgrt::detail {
namespace {

namespace asio = boost::asio;

HostAddresses getaddrinfo_lookup(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  addrinfo* found = nullptr;
  HostAddresses result;
  const int status = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
  if (status != 0) {
    result.error = status == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(status);
    return result;
  }
  for (const addrinfo* entry = found; entry != nullptr; entry = entry->ai_next) {
    char text[NI_MAXHOST] = {};
    // (NI_NUMERICHOST keeps an IPv6 address's scope, as in fe80::1%eth0.)
    if (::getnameinfo(entry->ai_addr, entry->ai_addrlen, text, sizeof text, nullptr, 0,
                      NI_NUMERICHOST) == 0) {
      result.addresses.emplace_back(text);
    }
  }
  ::freeaddrinfo(found);
  return result;
}

// One running lookup of one name, and the connects waiting for it (each by an eventfd that the
// lookup's thread writes to when it answers: the thread calls nothing of asio's, so an io_context
// that is being destroyed meanwhile is no concern of it).
struct Lookup {
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::mutex mutex;
  bool done = false;
  HostAddresses answer;
  std::vector<int> waiters;
};

// A lookup running longer than this is not joined: a connect from then on starts a fresh one (a
// getaddrinfo() stuck in NSS or a dead DNS server may take minutes, and DNS may be back already).
// The old one's thread ends when its getaddrinfo() returns; its answer is dropped.
constexpr std::chrono::seconds stale_after{5};
constexpr int max_threads_per_name = 3;

struct Lookups {
  std::mutex mutex;
  std::unordered_map<std::string, std::shared_ptr<Lookup>> running;
  std::unordered_map<std::string, int> threads;  // lookup threads still running, per name
  std::atomic<BlockingLookup> blocking{&getaddrinfo_lookup};
};

// Never destroyed: a lookup's thread may outlive main() (exit() does not wait for it).
Lookups& lookups() {
  static auto* all = new Lookups;
  return *all;
}

// A lookup's thread: looks the name up, then wakes every connect still waiting for it.
void run_lookup(const std::string& host, const std::shared_ptr<Lookup>& lookup,
                BlockingLookup blocking) noexcept {
  HostAddresses answer;
  try {
    answer = blocking(host);
  } catch (const std::exception& error) {  // (out of memory): the waiters hear it, no terminate
    answer = HostAddresses{.addresses = {}, .error = error.what()};
  } catch (...) {
    answer = HostAddresses{.addresses = {}, .error = "the lookup failed"};
  }
  {
    Lookups& all = lookups();
    std::lock_guard lock(all.mutex);  // a connect from now on starts a fresh lookup
    if (auto entry = all.running.find(host);
        entry != all.running.end() && entry->second == lookup) {
      all.running.erase(entry);
    }
    if (auto count = all.threads.find(host); count != all.threads.end() && --count->second <= 0) {
      all.threads.erase(count);
    }
  }
  std::lock_guard lock(lookup->mutex);
  lookup->done = true;
  lookup->answer = std::move(answer);
  for (const int waiter : lookup->waiters) {
    const std::uint64_t one = 1;
    (void)!::write(waiter, &one, sizeof one);
  }
}

std::shared_ptr<Lookup> join_or_start(const std::string& host) {
  Lookups& all = lookups();
  std::lock_guard lock(all.mutex);
  auto running = all.running.find(host);
  // A stale lookup is joined all the same once this many threads of the name hang: a
  // getaddrinfo() that never returns must not pile threads up, one per connect.
  if (running != all.running.end() &&
      (std::chrono::steady_clock::now() - running->second->started < stale_after ||
       all.threads[host] >= max_threads_per_name)) {
    return running->second;
  }
  auto lookup = std::make_shared<Lookup>();
  std::shared_ptr<Lookup> replaced;
  if (running != all.running.end()) {
    replaced = std::exchange(running->second, lookup);
  } else {
    all.running.emplace(host, lookup);
  }
  try {
    std::thread(run_lookup, host, lookup, all.blocking.load()).detach();
    ++all.threads[host];
  } catch (...) {
    if (replaced) {
      all.running[host] = std::move(replaced);
    } else {
      all.running.erase(host);
    }
    throw;
  }
  return lookup;
}

// A connect's place among a lookup's waiters, given up when the connect stops waiting (whatever
// the reason, the coroutine's destruction included) and before its eventfd is closed.
class Registration {
 public:
  Registration(std::shared_ptr<Lookup> lookup, int eventfd)
      : lookup_(std::move(lookup)), eventfd_(eventfd) {}
  Registration(const Registration&) = delete;
  Registration& operator=(const Registration&) = delete;
  ~Registration() {
    std::lock_guard lock(lookup_->mutex);
    std::erase(lookup_->waiters, eventfd_);
  }

 private:
  std::shared_ptr<Lookup> lookup_;
  int eventfd_;
};

// A waiter's deadline: its timer's handler (on any thread of the io_context) writes to the
// waiter's eventfd, as the lookup's thread does, unless the waiter has closed it. The only wake
// the coroutine waits for is the eventfd's: no asio object is touched from two threads.
struct Deadline {
  std::mutex mutex;
  int eventfd = -1;  // -1 once the waiter is gone
  bool passed = false;
};

class DeadlineGuard {
 public:
  explicit DeadlineGuard(std::shared_ptr<Deadline> deadline) : deadline_(std::move(deadline)) {}
  DeadlineGuard(const DeadlineGuard&) = delete;
  DeadlineGuard& operator=(const DeadlineGuard&) = delete;
  ~DeadlineGuard() {
    std::lock_guard lock(deadline_->mutex);
    deadline_->eventfd = -1;
  }

 private:
  std::shared_ptr<Deadline> deadline_;
};

}  // namespace

BlockingLookup replace_blocking_lookup(BlockingLookup lookup) noexcept {
  return lookups().blocking.exchange(lookup);
}

asio::awaitable<LookupEnd> look_up_host(
    const std::string& host, std::optional<std::chrono::steady_clock::time_point> deadline,
    HostAddresses& answer) {
  const auto here = co_await asio::this_coro::executor;
  const auto lookup = join_or_start(host);
  const int eventfd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (eventfd < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
  asio::posix::stream_descriptor woken(here);  // owns and closes it, once assigned
  if (boost::system::error_code unregistered; woken.assign(eventfd, unregistered)) {
    ::close(eventfd);  // (epoll would not take it: out of memory, a limit)
    throw boost::system::system_error(unregistered, "registering an eventfd");
  }
  // (Declared after `woken`: destroyed before it closes the eventfd, so that neither the lookup's
  // thread nor the deadline's handler writes to a descriptor number reused meanwhile.)
  const Registration registration(lookup, eventfd);
  auto timing = std::make_shared<Deadline>();
  timing->eventfd = eventfd;
  const DeadlineGuard timing_guard(timing);
  {
    std::lock_guard lock(lookup->mutex);
    if (lookup->done) {
      answer = lookup->answer;
      co_return LookupEnd::answered;
    }
    lookup->waiters.push_back(eventfd);
  }
  std::optional<asio::steady_timer> timer;
  if (deadline) {
    timer.emplace(here, *deadline);
    timer->async_wait([timing](boost::system::error_code error) {
      if (error) return;
      std::lock_guard lock(timing->mutex);
      timing->passed = true;
      if (timing->eventfd >= 0) {
        const std::uint64_t one = 1;
        (void)!::write(timing->eventfd, &one, sizeof one);
      }
    });
  }
  const auto [waited] = co_await woken.async_wait(asio::posix::stream_descriptor::wait_read,
                                                  asio::as_tuple(asio::use_awaitable));
  {
    std::lock_guard lock(lookup->mutex);
    if (lookup->done) {
      answer = lookup->answer;
      co_return LookupEnd::answered;
    }
  }
  if (waited) co_return LookupEnd::cancelled;
  std::lock_guard lock(timing->mutex);
  co_return timing->passed ? LookupEnd::timed_out : LookupEnd::cancelled;
}

}  // namespace pgrt::detail

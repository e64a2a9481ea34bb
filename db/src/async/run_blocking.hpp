#pragma once

// Runs a blocking call on a thread of its own and waits for it without blocking the executor and
// without polling: the thread marks a WaitGroup done as its last step, which wakes the coroutine.
//
// Returns what `function` returns, rethrows what it throws; the thread is then joined (it has
// finished). Cancellation (terminal, partial, total): the wait ends at once with
// boost::system::system_error(operation_aborted). Then, as when the coroutine is destroyed
// mid-wait (its io_context gone), the thread is detached: it owns everything it touches (the
// callable, its result, the group), never the coroutine's frame or executor, and destroys an
// unclaimed result itself when it ends (a lock it took is released).

#include <boost/asio/awaitable.hpp>
#include <boost/asio/error.hpp>
#include <boost/system/system_error.hpp>
#include <future>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>

#include "abandon_guard.hpp"
#include "wait_group.hpp"

namespace pgrt::detail::async {

template <typename Function>
asio::awaitable<std::invoke_result_t<Function>> run_blocking(Function function) {
  using Value = std::invoke_result_t<Function>;
  std::packaged_task<Value()> task(std::move(function));
  std::future<Value> outcome = task.get_future();
  const auto finished = std::make_shared<WaitGroup>();
  finished->add();
  std::thread worker([task = std::move(task), finished]() mutable {
    task();  // stores the value or the exception in `outcome`'s shared state
    finished->done();
  });
  AbandonGuard detach([&worker] { worker.detach(); });
  const Woken woken = co_await finished->wait();
  if (woken != Woken::notified) {
    throw boost::system::system_error(asio::error::operation_aborted, "run_blocking");
  }
  detach.disarm();
  worker.join();
  co_return outcome.get();
}

}  // namespace pgrt::detail::async

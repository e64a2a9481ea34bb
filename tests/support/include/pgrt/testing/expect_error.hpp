#pragma once

/// @file
/// For coroutine tests of the db layer: the pgrt::Error an operation throws.
/// (Header-only: include it from tests that link pgrt::db.)

#include <boost/asio/awaitable.hpp>
#include <gtest/gtest.h>
#include <utility>

#include "pgrt/db/error.hpp"

namespace pgrt::testing {

/// Awaits `operation` and returns the pgrt::Error it throws; records a test failure (and returns
/// a protocol_error placeholder) if it completes instead.
template <typename T>
boost::asio::awaitable<Error> expect_error(boost::asio::awaitable<T> operation) {
  try {
    co_await std::move(operation);
  } catch (const Error& error) {
    co_return error;
  }
  ADD_FAILURE() << "expected a pgrt::Error";
  co_return Error(make_error_code(client_errc::protocol_error), {});
}

}  // namespace pgrt::testing

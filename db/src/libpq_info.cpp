#include "pgrt/db/libpq_info.hpp"

#include <libpq-fe.h>

namespace pgrt {

int libpq_version() noexcept {
  return PQlibVersion();
}

bool libpq_is_thread_safe() noexcept {
  return PQisthreadsafe() != 0;
}

}  // namespace pgrt

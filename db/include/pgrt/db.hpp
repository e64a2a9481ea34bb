#pragma once

/// @file
/// Everything of pgrt's db layer: connections, queries, results, types, errors, transactions,
/// pipelines, COPY and deadlines.

#include "pgrt/db/connection.hpp"
#include "pgrt/db/copy.hpp"
#include "pgrt/db/deadline.hpp"
#include "pgrt/db/error.hpp"
#include "pgrt/db/hygiene.hpp"
#include "pgrt/db/libpq_info.hpp"
#include "pgrt/db/pending_writes.hpp"
#include "pgrt/db/pipeline.hpp"
#include "pgrt/db/pool.hpp"
#include "pgrt/db/result.hpp"
#include "pgrt/db/session_guards.hpp"
#include "pgrt/db/transaction.hpp"
#include "pgrt/db/types.hpp"

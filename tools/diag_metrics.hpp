#pragma once

// pgrt-diag metrics URL (diag_metrics.cpp).

namespace pgrt::diag {

// argv[1] is "metrics". Returns the exit code.
int run_metrics(int argc, char** argv);

}  // namespace pgrt::diag

#pragma once

// A COMMIT (or END) of a failed transaction block: the server answers it with the tag ROLLBACK and
// no error, yet none of the block's work was committed. Every way such a statement is sent
// (Connection::commit(), query(), execute(), a Pipeline) reports it as SQLSTATE 25P02.

#include <libpq-fe.h>
#include <string>
#include <string_view>

#include "../sql_text.hpp"
#include "pgrt/db/error.hpp"

namespace pgrt::detail {

// 25P02, with `diagnostics` set, for such a `result` of `statement`; no error for any other.
inline boost::system::error_code commit_rolled_back(PGresult* result, std::string_view statement,
                                                    Diagnostics& diagnostics) {
  if (PQresultStatus(result) != PGRES_COMMAND_OK ||
      std::string_view(PQcmdStatus(result)) != "ROLLBACK") {
    return {};
  }
  const std::string keyword = first_keyword(statement);
  if (keyword != "commit" && keyword != "end") return {};
  diagnostics = Diagnostics{.sqlstate = "25P02",
                            .severity = "ERROR",
                            .message = "the transaction had failed, so COMMIT rolled it back",
                            .hint =
                                "an earlier statement of the transaction block failed; none "
                                "of the block's work was committed",
                            .statement = std::string(statement)};
  return make_sqlstate_error("25P02");
}

}  // namespace pgrt::detail

// The queue of Pool::query()'s statements waiting for a connection (pool/multiplexer.hpp): order,
// removal from anywhere, and that it keeps its statements alive exactly while they are in it.
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <vector>

#include "pool/multiplexer.hpp"

namespace pgrt::detail {
namespace {

std::shared_ptr<SharedStatement> statement(const std::string& sql) {
  return std::make_shared<SharedStatement>(sql, ParamSink{});
}

std::vector<std::string> contents(const StatementQueue& queue) {
  std::vector<std::string> sqls;
  queue.for_each([&](const SharedStatement& queued) { sqls.push_back(queued.sql); });
  return sqls;
}

TEST(StatementQueue, KeepsOrderAtBothEnds) {
  StatementQueue queue;
  EXPECT_TRUE(queue.empty());
  queue.push_back(statement("b"));
  queue.push_back(statement("c"));
  queue.push_front(statement("a"));  // a statement sent again goes first
  EXPECT_EQ(queue.size(), 3U);
  EXPECT_EQ(contents(queue), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(queue.pop_front()->sql, "a");
  EXPECT_EQ(queue.pop_front()->sql, "b");
  EXPECT_EQ(queue.pop_front()->sql, "c");
  EXPECT_TRUE(queue.empty());
}

TEST(StatementQueue, RemovesFromTheFrontTheMiddleAndTheBackAndIgnoresWhatIsNotQueued) {
  StatementQueue queue;
  std::vector<std::shared_ptr<SharedStatement>> all;
  for (const char* sql : {"0", "1", "2", "3", "4"}) {
    all.push_back(statement(sql));
    queue.push_back(all.back());
  }
  queue.remove(*all[2]);
  queue.remove(*all[0]);
  queue.remove(*all[4]);
  EXPECT_EQ(contents(queue), (std::vector<std::string>{"1", "3"}));
  queue.remove(*all[2]);  // gone already: nothing happens
  const auto outsider = statement("x");
  queue.remove(*outsider);  // never queued: nothing happens
  EXPECT_EQ(queue.size(), 2U);
  queue.push_back(all[0]);  // taken out, it can be queued again
  EXPECT_EQ(contents(queue), (std::vector<std::string>{"1", "3", "0"}));
}

TEST(StatementQueue, RemoveIfTakesOutWhatItIsToldAndKeepsTheRestInOrder) {
  StatementQueue queue;
  for (const char* sql : {"0", "1", "2", "3", "4", "5"}) queue.push_back(statement(sql));
  std::vector<std::string> visited;
  queue.remove_if([&](SharedStatement& queued) {
    visited.push_back(queued.sql);
    return (queued.sql[0] - '0') % 2 == 0;
  });
  EXPECT_EQ(visited, (std::vector<std::string>{"0", "1", "2", "3", "4", "5"}));
  EXPECT_EQ(contents(queue), (std::vector<std::string>{"1", "3", "5"}));
  queue.remove_if([](SharedStatement&) { return true; });
  EXPECT_TRUE(queue.empty());
}

TEST(StatementQueue, HoldsItsStatementsAliveExactlyWhileTheyAreQueued) {
  std::weak_ptr<SharedStatement> popped;
  std::weak_ptr<SharedStatement> removed;
  std::weak_ptr<SharedStatement> left;
  {
    StatementQueue queue;
    {
      auto first = statement("first");
      auto second = statement("second");
      auto third = statement("third");
      popped = first;
      removed = second;
      left = third;
      queue.push_back(std::move(first));
      queue.push_back(second);
      queue.push_back(std::move(third));
      queue.remove(*second);
    }  // the callers' references are gone: the queue's alone keep the rest alive
    EXPECT_TRUE(removed.expired());
    EXPECT_FALSE(popped.expired());
    EXPECT_FALSE(left.expired());
    EXPECT_EQ(queue.pop_front()->sql, "first");
    EXPECT_TRUE(popped.expired());
    EXPECT_FALSE(left.expired());
  }  // a queue destroyed with statements in it releases them
  EXPECT_TRUE(left.expired());
}

}  // namespace
}  // namespace pgrt::detail

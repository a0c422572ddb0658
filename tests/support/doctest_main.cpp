// The main of every doctest suite. ctest runs each test case on its own, by
// name (doctest_discover_tests: --test-case=NAME). A name that does not pass
// through intact (CMake splits it at a ';') selects no test case, and doctest
// counts a run of none as a success: such a test would never run, and never
// fail. So a run filtered by test case that selected none fails here.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>

namespace {

unsigned selected = 0;
bool run_ended = false;

struct selection_counter : doctest::IReporter {
  explicit selection_counter(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats& stats) override {
    selected = stats.numTestCasesPassingFilters;
    run_ended = true;
  }
  void test_case_start(const doctest::TestCaseData&) override {}
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};

REGISTER_LISTENER("selection_counter", 1, selection_counter);

bool filtered_by_test_case(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    for (const char* prefix : {"--test-case=", "-tc=", "--dt-test-case=", "--dt-tc="})
      if (std::strncmp(argv[i], prefix, std::strlen(prefix)) == 0)
        return true;
  return false;
}

} // namespace

int main(int argc, char** argv) {
  doctest::Context context{argc, argv};
  int rc = context.run();
  if (context.shouldExit())
    return rc;  // a query (--list-test-cases, --help): nothing ran
  if (rc == 0 && run_ended && selected == 0 && filtered_by_test_case(argc, argv)) {
    std::fprintf(stderr,
                 "no test case matches the --test-case filter: it ran nothing (a test case "
                 "name with ';' cannot pass through ctest)\n");
    return 1;
  }
  return rc;
}

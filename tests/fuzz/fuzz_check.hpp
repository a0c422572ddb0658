// What every fuzz target shares: an invariant check that aborts (libFuzzer
// keeps the input) with the target's name, and the entry point that turns an
// exception escaping the code under test into a finding.
#pragma once

#include <errno.h>  // program_invocation_short_name (glibc)

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

namespace dspex::fuzz {

[[noreturn]] inline void fail(const char* what, const std::string& detail = {}) {
  std::fprintf(stderr, "%s: invariant violated: %s %s\n", program_invocation_short_name, what,
               detail.c_str());
  std::abort();
}

/// Runs one input; an exception out of `run` is a finding (abort).
template <class Run>
int run_input(Run&& run) {
  try {
    run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: unexpected exception: %s\n", program_invocation_short_name, e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "%s: unexpected non-std exception\n", program_invocation_short_name);
    std::abort();
  }
  return 0;
}

} // namespace dspex::fuzz

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::dspex::fuzz::fail(#cond);                                                                  \
  } while (0)

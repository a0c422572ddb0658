// bench_pool: the benchmark (examples/bench/bench.hpp) as a program of its own.
#include "bench.hpp"

int main(int argc, char** argv) {
  return dspex::bench::run(argc, argv, {});
}

// How many sequential streams per core does it take to reach the memory bandwidth?
//
// The CPU kernels cut every tensor into chunks and hand contiguous runs of chunks to the
// threads. A chunk can be walked as one stream, or as S equal sub-ranges side by side (one
// 64-byte block of each in turn). The hardware prefetcher follows each stream separately, so
// more streams put more cache lines in flight per core. This program measures, for S = 1..16,
// three loops over buffers much larger than the caches:
//
//   read    sum of squares of one fp32 array                      (4 B per element)
//   scale   x *= c in place                                       (8 B per element)
//   adam    an AdamW-like update: read p, g, m, v; write p, m, v  (28 B per element)
//
// The S values are measured in interleaved rounds (noisy neighbours on a VM hit them alike);
// each line is the best of the rounds. Build and run (one thread per core):
//
//   g++ -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math -ffp-contract=fast
//       benchmarks/stream_count.cpp -o /tmp/stream_count      (setup.py's flags for the CPU code)
//   OMP_NUM_THREADS=2 /tmp/stream_count [MiB per array, default 512] [chunk elements, 16384]
//
// Results: benchmarks/results/stream-count-<machine>-<date>.txt.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <vector>

namespace {

constexpr int kLanes = 16;  // fp32 elements of one 64-byte block

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Elements of each of S sub-ranges of an n-element chunk (whole blocks; n is a multiple of
// S * kLanes here, so there is no tail).
long per_stream(long n, int streams) { return n / streams / kLanes * kLanes; }

float read_chunk(const float* x, long n, int streams) {
  const long per = per_stream(n, streams);
  float acc[16][kLanes] = {};
  for (long b = 0; b < per; b += kLanes) {
    for (int s = 0; s < streams; ++s) {
      const float* v = x + s * per + b;
      for (int j = 0; j < kLanes; ++j) acc[s][j] += v[j] * v[j];
    }
  }
  float total = 0;
  for (int s = 0; s < streams; ++s) {
    for (int j = 0; j < kLanes; ++j) total += acc[s][j];
  }
  return total;
}

void scale_chunk(float* x, long n, int streams, float c) {
  const long per = per_stream(n, streams);
  for (long b = 0; b < per; b += kLanes) {
    for (int s = 0; s < streams; ++s) {
      float* v = x + s * per + b;
      for (int j = 0; j < kLanes; ++j) v[j] *= c;
    }
  }
}

void adam_chunk(float* p, const float* g, float* m, float* v, long n, int streams) {
  const long per = per_stream(n, streams);
  const float b1 = 0.9f, b2 = 0.999f, lr = 1e-3f, eps = 1e-8f, decay = 1 - 1e-5f;
  for (long b = 0; b < per; b += kLanes) {
    for (int s = 0; s < streams; ++s) {
      const long o = s * per + b;
      for (int j = 0; j < kLanes; ++j) {
        const float gi = g[o + j];
        const float mi = b1 * m[o + j] + (1 - b1) * gi;
        const float vi = b2 * v[o + j] + (1 - b2) * gi * gi;
        m[o + j] = mi;
        v[o + j] = vi;
        p[o + j] = p[o + j] * decay - lr * mi / (__builtin_sqrtf(vi) + eps);
      }
    }
  }
}

float* make(long n, float value) {
  float* x = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  #pragma omp parallel for schedule(static)
  for (long i = 0; i < n; ++i) x[i] = value;
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  const long mib = argc > 1 ? std::atol(argv[1]) : 512;
  const long chunk = argc > 2 ? std::atol(argv[2]) : 16384;
  const long n = mib * 1024 * 1024 / 4 / (chunk * 16) * (chunk * 16);
  const long chunks = n / chunk;
  const long adam_n = n / 4 / chunk * chunk;  // four arrays of the same total size
  const long adam_chunks = adam_n / chunk;
  float* x = make(n, 1.0f);
  float* p = make(adam_n, 1.0f);
  float* g = make(adam_n, 1e-3f);
  float* m = make(adam_n, 0.0f);
  float* v = make(adam_n, 0.0f);
  const std::vector<int> counts = {1, 2, 4, 8, 16};
  std::vector<double> best_read(counts.size(), 1e30), best_scale(counts.size(), 1e30),
      best_adam(counts.size(), 1e30);
  volatile float sink = 0;
  volatile float one = 1.0f;  // read at run time: a literal 1 would let the compiler drop x *= 1
  const float factor = one;
  for (int round = 0; round < 5; ++round) {
    for (size_t k = 0; k < counts.size(); ++k) {
      const int s = counts[k];
      double t = seconds();
      float total = 0;
      #pragma omp parallel for schedule(static) reduction(+ : total)
      for (long c = 0; c < chunks; ++c) total += read_chunk(x + c * chunk, chunk, s);
      best_read[k] = std::min(best_read[k], seconds() - t);
      sink = sink + total;

      t = seconds();
      #pragma omp parallel for schedule(static)
      for (long c = 0; c < chunks; ++c) scale_chunk(x + c * chunk, chunk, s, factor);
      best_scale[k] = std::min(best_scale[k], seconds() - t);

      t = seconds();
      #pragma omp parallel for schedule(static)
      for (long c = 0; c < adam_chunks; ++c) {
        const long o = c * chunk;
        adam_chunk(p + o, g + o, m + o, v + o, chunk, s);
      }
      best_adam[k] = std::min(best_adam[k], seconds() - t);
    }
  }
  std::printf("threads %d, %ld MiB per loop, chunks of %ld elements; GB/s (best of 5 rounds)\n",
              omp_get_max_threads(), mib, chunk);
  std::printf("%8s %10s %10s %10s\n", "streams", "read", "scale", "adam");
  for (size_t k = 0; k < counts.size(); ++k) {
    std::printf("%8d %10.1f %10.1f %10.1f\n", counts[k], 4.0 * n / best_read[k] / 1e9,
                8.0 * n / best_scale[k] / 1e9, 28.0 * adam_n / best_adam[k] / 1e9);
  }
  std::free(x);
  std::free(p);
  std::free(g);
  std::free(m);
  std::free(v);
  return 0;
}

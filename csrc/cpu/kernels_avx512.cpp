// The vector primitives for CPUs with AVX512 F/BW/VL/DQ (chosen at run time by margin_cpu.cpp).
// See kernels_avx2.cpp for how the target is set.
#include "cpu/vec_kernels.h"

#if ANGULAR_X86_DISPATCH
#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// GCC's pragma does not define the target macros in C++; sleef.h and at::vec test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/vec_kernels_impl.h"
#endif

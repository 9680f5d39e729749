// The vector primitives for CPUs with AVX2 and FMA (chosen at run time by margin_cpu.cpp).
//
// Headers that need no AVX2 are included first, with the default target; the pragma then compiles
// at::vec's AVX2 implementation and our kernels for AVX2, as ATen's per-capability kernels are.
#include "cpu/vec_kernels.h"

#if ANGULAR_X86_DISPATCH
#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/vec_kernels_impl.h"
#endif

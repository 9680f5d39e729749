// The vector primitives for any CPU (at::vec's portable DEFAULT implementation).
#define CPU_CAPABILITY DEFAULT
#include "cpu/vec_kernels_impl.h"

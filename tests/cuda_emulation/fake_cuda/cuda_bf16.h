// Emulation stand-in for the CUDA header of the same name (see emu_cuda.h).
#pragma once
#include "emu_cuda.h"

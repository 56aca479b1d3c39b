#pragma once
#include "emu_core.h"

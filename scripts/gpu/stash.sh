#!/usr/bin/env bash
# Call A: stash the FA4 wheel parts this call carries (.fa4/1); the next call carries .fa4/2.
source scripts/gpu/env.sh
ls -la "$FA4_PARTS"

//go:build !linux

package attest

import (
	"errors"
	"os"
)

// reseedCRNG exists only on Linux, the only system Nitro Enclaves run.
func reseedCRNG(*os.File) error { return errors.New("CRNG reseed is Linux-only") }

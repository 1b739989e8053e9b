package attest

import (
	"time"

	"go.uber.org/zap"
)

// Test hooks: the clocks and the NSM session are not part of the API.

func NewSimulatedAt(log *zap.Logger, now func() time.Time) (*Simulated, error) {
	return newSimulated(log, now, nil, nil)
}

func SetClock(a *Attester, now func() time.Time) { a.now = now }

func NewDeviceWithSession(sess session, entropyPath string, log *zap.Logger) *Device {
	return newDevice(sess, entropyPath, log)
}

const SeedBytes = seedBytes

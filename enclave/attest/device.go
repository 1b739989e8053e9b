package attest

import (
	"bytes"
	"fmt"
	"os"
	"sync"
	"syscall"

	"github.com/hf/nsm"
	"github.com/hf/nsm/request"
	"github.com/hf/nsm/response"
	"go.uber.org/zap"
)

// seedBytes is how much NSM randomness SeedKernelEntropy mixes in: 2048
// bits, far more than the 256 bits the kernel's CRNG needs.
const seedBytes = 256

// session is the part of *nsm.Session the Device uses; tests substitute a
// fake, since /dev/nsm exists only inside a Nitro Enclave.
type session interface {
	Send(request.Request) (response.Response, error)
	Read(into []byte) (int, error)
	Close() error
}

var _ session = (*nsm.Session)(nil)

// Device is the real NSM on /dev/nsm. It is deliberately thin: it bounds the
// request, forwards it through hf/nsm and wraps every failure with ErrNSM.
type Device struct {
	log         *zap.Logger
	entropyPath string

	// mu makes Close exclusive: hf/nsm's Session must not be closed while
	// a Send or Read is in flight.
	mu   sync.RWMutex
	sess session // nil once closed
}

var (
	_ NSM    = (*Device)(nil)
	_ Seeder = (*Device)(nil)
)

// OpenDevice opens the NSM device at path. entropyPath is where
// SeedKernelEntropy writes (normally /dev/random).
func OpenDevice(path, entropyPath string, log *zap.Logger) (*Device, error) {
	sess, err := nsm.OpenSession(nsm.Options{
		Open:    func() (nsm.FileDescriptor, error) { return os.Open(path) },
		Syscall: syscall.Syscall,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: opening %s: %w", ErrNSM, path, err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	log.Info("using the Nitro Secure Module", zap.String("device", path))
	return newDevice(sess, entropyPath, log), nil
}

func newDevice(sess session, entropyPath string, log *zap.Logger) *Device {
	return &Device{log: log, entropyPath: entropyPath, sess: sess}
}

// Attestation implements NSM.
func (d *Device) Attestation(nonce, userData, publicKey []byte) ([]byte, error) {
	if err := checkSizes(nonce, userData, publicKey); err != nil {
		return nil, err
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.sess == nil {
		return nil, fmt.Errorf("%w: device closed", ErrNSM)
	}
	res, err := d.sess.Send(&request.Attestation{
		Nonce:     orNil(nonce),
		UserData:  orNil(userData),
		PublicKey: orNil(publicKey),
	})
	if err != nil {
		return nil, fmt.Errorf("%w: attestation request: %w", ErrNSM, err)
	}
	if res.Error != "" {
		return nil, fmt.Errorf("%w: attestation request: NSM error %s", ErrNSM, res.Error)
	}
	if res.Attestation == nil || len(res.Attestation.Document) == 0 {
		return nil, fmt.Errorf("%w: attestation response carries no document", ErrNSM)
	}
	return bytes.Clone(res.Attestation.Document), nil
}

// Random implements NSM.
func (d *Device) Random(p []byte) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.sess == nil {
		return fmt.Errorf("%w: device closed", ErrNSM)
	}
	if _, err := d.sess.Read(p); err != nil {
		return fmt.Errorf("%w: random request: %w", ErrNSM, err)
	}
	return nil
}

// Close implements NSM.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sess == nil {
		return nil
	}
	err := d.sess.Close()
	d.sess = nil
	if err != nil {
		return fmt.Errorf("%w: closing: %w", ErrNSM, err)
	}
	return nil
}

// SeedKernelEntropy reads seedBytes from the NSM and writes them to the
// kernel's pool (EntropyPath, /dev/random), which mixes them in without
// crediting entropy; it then asks the kernel to reseed its CRNG at once
// (best effort: this needs CAP_SYS_ADMIN).
//
// Why the kernel pool and not a custom io.Reader: since Go 1.24, key
// generation on the FIPS 140-3 code paths ignores a caller's random reader,
// and since Go 1.26 crypto/ecdsa, crypto/rsa and crypto/ed25519 GenerateKey
// ignore their rand parameter altogether (unless GODEBUG=cryptocustomrand=1,
// a setting due to be removed) and draw from the kernel (getrandom(2)).
// Mixing NSM entropy into the kernel pool is therefore the only way it
// reaches the signer's keys.
func (d *Device) SeedKernelEntropy() error {
	buf := make([]byte, seedBytes)
	defer clear(buf)
	if err := d.Random(buf); err != nil {
		return fmt.Errorf("seeding kernel entropy: %w", err)
	}
	f, err := os.OpenFile(d.entropyPath, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("seeding kernel entropy: %w", err)
	}
	defer f.Close()
	if _, err := f.Write(buf); err != nil {
		return fmt.Errorf("seeding kernel entropy: writing %s: %w", d.entropyPath, err)
	}
	if err := reseedCRNG(f); err != nil {
		// Without the reseed the bytes still enter the input pool and reach
		// the CRNG at its next scheduled reseed.
		d.log.Debug("immediate CRNG reseed unavailable", zap.Error(err))
	}
	d.log.Info("seeded the kernel entropy pool from the NSM", zap.Int("bytes", seedBytes))
	return nil
}

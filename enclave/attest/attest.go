// Package attest gives the enclave its Nitro Secure Module: attestation
// documents that bind the signing keys to the enclave's measurements, and
// random bytes that seed the kernel's entropy pool before keys are generated.
//
// The NSM sits behind the small NSM interface. Open picks the implementation:
// the real device (/dev/nsm, via github.com/hf/nsm) whenever it exists, else
// the simulated NSM, but only when Config.DevSimulatedNSM is set explicitly.
// The simulated NSM signs documents in the genuine format with a throwaway
// development CA, so host/verify checks them with the very same code, against
// the development root instead of the AWS root.
//
// The Attester caches the start-up document (no nonce, user_data = the key
// commitment of internal/keycommit) and asks the NSM for a fresh document
// only when a caller brings a nonce or user data: every NSM call is an
// expensive ioctl.
package attest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
)

// MaxFieldSize is the largest nonce, user_data or public_key an attestation
// request may carry. The NSM specification sets it, but the hypervisor does
// not enforce it, so we do. Three full fields plus CBOR framing stay under
// the NSM's 4 KiB request limit.
const MaxFieldSize = 1024

// Defaults of Config.
const (
	DefaultDevicePath  = "/dev/nsm"
	DefaultEntropyPath = "/dev/random"
	// DefaultCacheMaxAge bounds the age of the cached start-up document. A
	// genuine leaf certificate lives about three hours, so a document older
	// than that no longer verifies; an hour leaves clients ample margin.
	DefaultCacheMaxAge = time.Hour
)

var (
	// ErrInvalidArgument is wrapped when a request field exceeds its limit.
	ErrInvalidArgument = errors.New("attest: invalid argument")
	// ErrNSM is wrapped when the NSM fails or answers nonsense; the edge
	// maps it to Unavailable.
	ErrNSM = errors.New("attest: nitro secure module failure")
	// ErrNoDevice is returned by Open when there is no NSM device and the
	// simulated NSM was not asked for.
	ErrNoDevice = errors.New("attest: NSM device unavailable")
	// ErrKeys is wrapped when the key source yields no usable key list.
	ErrKeys = errors.New("attest: signing keys unusable")
)

// Config selects and tunes the NSM.
type Config struct {
	// DevSimulatedNSM allows the simulated NSM when DevicePath does not
	// exist. Development only: its documents are not genuine. Ignored (with
	// a warning) when the device exists. Default false.
	DevSimulatedNSM bool
	// DevRootFile, DEVELOPMENT ONLY, is a PEM file with a development
	// root certificate and its private key (NewDevRoot) that the
	// simulated NSM issues from, instead of a throwaway root of its own:
	// several simulated enclaves then chain to one root, which a test KMS
	// can trust as AWS KMS trusts the AWS Nitro root. Needs
	// DevSimulatedNSM. Default none.
	DevRootFile string
	// DevicePath is the NSM device node. Default /dev/nsm.
	DevicePath string
	// EntropyPath is where SeedKernelEntropy writes NSM random bytes.
	// Default /dev/random.
	EntropyPath string
	// CacheMaxAge is the longest the start-up document is served from the
	// cache before the NSM is asked again; it is renewed earlier when its
	// leaf certificate nears expiry. Default 1h.
	CacheMaxAge time.Duration
}

// Validate reports a precise error for an unusable Config.
func (c Config) Validate() error {
	for _, p := range []struct{ name, path string }{
		{"device path", c.DevicePath}, {"entropy path", c.EntropyPath},
	} {
		if p.path != "" && !filepath.IsAbs(p.path) {
			return fmt.Errorf("attest: %s %q must be absolute", p.name, p.path)
		}
	}
	if c.CacheMaxAge < 0 {
		return fmt.Errorf("attest: cache max age %v must not be negative", c.CacheMaxAge)
	}
	if c.DevRootFile != "" && !c.DevSimulatedNSM {
		return errors.New("attest: --dev-simulated-nsm-root is for the simulated NSM: it needs --dev-simulated-nsm")
	}
	return nil
}

func (c Config) withDefaults() Config {
	if c.DevicePath == "" {
		c.DevicePath = DefaultDevicePath
	}
	if c.EntropyPath == "" {
		c.EntropyPath = DefaultEntropyPath
	}
	if c.CacheMaxAge == 0 {
		c.CacheMaxAge = DefaultCacheMaxAge
	}
	return c
}

// NSM is the part of the Nitro Secure Module the enclave uses. It is safe
// for concurrent use, except that Close must not race with other calls.
type NSM interface {
	// Attestation returns an untagged COSE_Sign1 attestation document. Each
	// argument is at most MaxFieldSize bytes (else ErrInvalidArgument); an
	// empty one is left out (null in the document).
	Attestation(nonce, userData, publicKey []byte) ([]byte, error)
	// Random fills p with random bytes from the NSM.
	Random(p []byte) error
	// Close releases the device. Later calls fail with ErrNSM.
	Close() error
}

// Seeder mixes NSM entropy into the kernel's pool. The signer declares an
// optional dependency on it and calls it before generating keys.
type Seeder interface {
	SeedKernelEntropy() error
}

// Simulation is implemented by NSMs whose documents are not genuine. It
// returns the DER of the development root they chain to.
type Simulation interface {
	DevRootDER() []byte
}

// nsmSeeder is what Open returns: both implementations are also Seeders.
type nsmSeeder interface {
	NSM
	Seeder
}

// Open returns the real NSM if cfg.DevicePath exists, else the simulated NSM
// if cfg.DevSimulatedNSM is set, else an error wrapping ErrNoDevice. The
// value returned also implements Seeder.
func Open(cfg Config, log *zap.Logger) (NSM, error) {
	n, err := open(cfg, log)
	if err != nil {
		return nil, err
	}
	return n, nil
}

func open(cfg Config, log *zap.Logger) (nsmSeeder, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if log == nil {
		log = zap.NewNop()
	}
	_, err := os.Stat(cfg.DevicePath)
	switch {
	case err == nil:
		if cfg.DevSimulatedNSM {
			log.Warn("the simulated-NSM development flag is ignored: an NSM device exists, using the real NSM",
				zap.String("device", cfg.DevicePath))
		}
		return OpenDevice(cfg.DevicePath, cfg.EntropyPath, log)
	case errors.Is(err, fs.ErrNotExist):
		if !cfg.DevSimulatedNSM {
			return nil, fmt.Errorf("%w: no %s: not running in a Nitro Enclave; pass --dev-simulated-nsm "+
				"for development (documents will not be genuine)", ErrNoDevice, cfg.DevicePath)
		}
		if cfg.DevRootFile != "" {
			pemBytes, err := os.ReadFile(cfg.DevRootFile)
			if err != nil {
				return nil, fmt.Errorf("%w: simulated NSM root: %w", ErrNSM, err)
			}
			return NewSimulatedFromRoot(log, pemBytes)
		}
		return NewSimulated(log)
	default:
		return nil, fmt.Errorf("%w: checking %s: %w", ErrNSM, cfg.DevicePath, err)
	}
}

// Module provides the NSM (closed on stop), the same value as a Seeder, and
// the *Attester. It needs a Config, a *zap.Logger and a KeySource.
var Module = fx.Module("attest",
	fx.Provide(provideNSM, New),
)

func provideNSM(lc fx.Lifecycle, cfg Config, log *zap.Logger) (NSM, Seeder, error) {
	if log == nil {
		log = zap.NewNop()
	}
	n, err := open(cfg, log.Named("nsm"))
	if err != nil {
		return nil, nil, err
	}
	lc.Append(fx.StopHook(n.Close))
	return n, n, nil
}

// checkSizes enforces MaxFieldSize on the three request fields.
func checkSizes(nonce, userData, publicKey []byte) error {
	for _, f := range []struct {
		name string
		b    []byte
	}{{"nonce", nonce}, {"user_data", userData}, {"public_key", publicKey}} {
		if len(f.b) > MaxFieldSize {
			return fmt.Errorf("%w: %s is %d bytes, at most %d allowed", ErrInvalidArgument, f.name, len(f.b), MaxFieldSize)
		}
	}
	return nil
}

// orNil maps an empty slice to nil, which hf/nsm encodes as CBOR null: the
// NSM then leaves the field out, as it does for absent fields.
func orNil(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return b
}

package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"strconv"
	"sync"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"
	"go.uber.org/zap"
)

// Lifetimes of the development chain. The leaf mimics AWS's (about three
// hours) and is reissued when less than simLeafRenew of it is left, so a
// long-running development enclave never serves an expired chain.
const (
	simRootLifetime = 365 * 24 * time.Hour
	simLeafLifetime = 3 * time.Hour
	simLeafRenew    = time.Hour
	// simBackdate absorbs clock skew between the enclave and the verifier.
	simBackdate = 5 * time.Minute
)

// simPCRLabel prefixes the text whose SHA-384 gives a simulated PCR.
const simPCRLabel = "nitrosign/dev-simulated-nsm/pcr"

// SimulatedPCRs returns the PCRs every simulated document carries: PCR0,
// PCR1 and PCR2 (image, kernel, application) are SHA-384 of
// "nitrosign/dev-simulated-nsm/pcr<index>", fixed and public so development
// clients can pin them, non-zero so that verifiers do not take them for a
// debug-mode enclave, and never equal to a real image's measurement. PCR3 to
// PCR15 are zero (no IAM role, instance id or signing certificate applies).
func SimulatedPCRs() map[uint][]byte {
	pcrs := make(map[uint][]byte, 16)
	for i := uint(0); i < 16; i++ {
		v := make([]byte, sha512.Size384)
		if i <= 2 {
			sum := sha512.Sum384([]byte(simPCRLabel + strconv.FormatUint(uint64(i), 10)))
			v = sum[:]
		}
		pcrs[i] = v
	}
	return pcrs
}

// Simulated is a development stand-in for the NSM. Its documents have the
// genuine format (untagged COSE_Sign1, ES384, raw r||s signature, the NSM's
// payload map with an indefinite-length encoding as current NSMs use, root
// first in cabundle) but are signed by a development CA made when it is
// constructed: they prove nothing and must never be trusted in production.
type Simulated struct {
	log      *zap.Logger
	now      func() time.Time
	moduleID string
	pcrs     cbor.RawMessage

	rootDER         []byte
	intermediate    *x509.Certificate
	intermediateKey *ecdsa.PrivateKey

	mu      sync.Mutex
	closed  bool
	leaf    *x509.Certificate
	leafKey *ecdsa.PrivateKey
}

var (
	_ NSM        = (*Simulated)(nil)
	_ Seeder     = (*Simulated)(nil)
	_ Simulation = (*Simulated)(nil)
)

// NewSimulated builds a simulated NSM with a fresh development chain (root
// P-384 self-signed CA -> intermediate CA -> leaf P-384) and logs a warning
// that its documents are not genuine.
func NewSimulated(log *zap.Logger) (*Simulated, error) {
	return newSimulated(log, time.Now, nil, nil)
}

// NewSimulatedFromRoot is NewSimulated issuing from the development root
// in pemBytes (a CA certificate and its P-384 key, PEM; fakes/devroot
// makes one) instead of a fresh one, so that several simulated enclaves
// chain to one root.
func NewSimulatedFromRoot(log *zap.Logger, pemBytes []byte) (*Simulated, error) {
	var cert *x509.Certificate
	var key *ecdsa.PrivateKey
	for rest := pemBytes; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		switch b.Type {
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%w: simulated NSM root: %w", ErrNSM, err)
			}
			cert = c
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
			ek, ok := k.(*ecdsa.PrivateKey)
			if err != nil || !ok || ek.Curve != elliptic.P384() {
				return nil, fmt.Errorf("%w: simulated NSM root: the key is not an ECDSA P-384 PKCS #8 key", ErrNSM)
			}
			key = ek
		}
	}
	if cert == nil || key == nil || !cert.IsCA || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: simulated NSM root: want a CA certificate and its P-384 key (PEM)", ErrNSM)
	}
	return newSimulated(log, time.Now, cert, key)
}

func devRootTemplate(t time.Time) *x509.Certificate {
	return &x509.Certificate{
		Subject: pkix.Name{
			CommonName:         "nitrosign-dev-root NOT GENUINE",
			OrganizationalUnit: []string{"simulated NSM"},
			Organization:       []string{"nitrosign development"},
		},
		NotBefore:             t.Add(-simBackdate),
		NotAfter:              t.Add(simRootLifetime),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
}

func newSimulated(log *zap.Logger, now func() time.Time, root *x509.Certificate, rootKey *ecdsa.PrivateKey) (*Simulated, error) {
	if log == nil {
		log = zap.NewNop()
	}
	idBytes := make([]byte, 8)
	if _, err := rand.Read(idBytes); err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	s := &Simulated{
		log:      log,
		now:      now,
		moduleID: "i-00000000000000000-dev" + hex.EncodeToString(idBytes),
	}
	pcrs, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	if s.pcrs, err = pcrs.Marshal(SimulatedPCRs()); err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}

	t := now()
	if root == nil {
		if rootKey, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader); err != nil {
			return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
		}
		if root, err = issue(devRootTemplate(t), nil, &rootKey.PublicKey, rootKey); err != nil {
			return nil, err
		}
	}
	s.rootDER = root.Raw
	if s.intermediateKey, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader); err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	s.intermediate, err = issue(&x509.Certificate{
		Subject: pkix.Name{
			CommonName:         s.moduleID[:len("i-00000000000000000")] + ".dev.nitrosign.invalid",
			OrganizationalUnit: []string{"simulated NSM"},
			Organization:       []string{"nitrosign development"},
		},
		NotBefore:             t.Add(-simBackdate),
		NotAfter:              t.Add(simRootLifetime),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}, root, &s.intermediateKey.PublicKey, rootKey)
	if err != nil {
		return nil, err
	}
	if err := s.renewLeafLocked(t); err != nil {
		return nil, err
	}

	rootSum := sha256.Sum256(s.rootDER)
	log.Warn("SIMULATED NSM IN USE: attestation documents are NOT genuine; they are signed by a throwaway "+
		"development CA and prove nothing. Never use --dev-simulated-nsm in production, and never trust "+
		"its root outside development.",
		zap.String("module_id", s.moduleID),
		zap.String("dev_root_sha256", hex.EncodeToString(rootSum[:])))
	return s, nil
}

// issue creates a P-384 / ECDSA-SHA384 certificate for pub, signed by
// parentKey (self-signed when parent is nil).
func issue(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, parentKey *ecdsa.PrivateKey) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	tmpl.SerialNumber = serial
	tmpl.SignatureAlgorithm = x509.ECDSAWithSHA384
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: issuing %q: %w", ErrNSM, tmpl.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	return cert, nil
}

// renewLeafLocked issues a fresh leaf key and certificate. s.mu is held (or
// s is not yet shared).
func (s *Simulated) renewLeafLocked(t time.Time) error {
	key, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	leaf, err := issue(&x509.Certificate{
		Subject: pkix.Name{
			CommonName:         s.moduleID + ".dev.nitrosign.invalid",
			OrganizationalUnit: []string{"simulated NSM"},
			Organization:       []string{"nitrosign development"},
		},
		NotBefore:             t.Add(-simBackdate),
		NotAfter:              t.Add(simLeafLifetime),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
	}, s.intermediate, &key.PublicKey, s.intermediateKey)
	if err != nil {
		return err
	}
	s.leaf, s.leafKey = leaf, key
	return nil
}

// DevRootDER implements Simulation: the development root, which a client
// must pass explicitly to host/verify.
func (s *Simulated) DevRootDER() []byte { return bytes.Clone(s.rootDER) }

// ModuleID returns the simulated module id ("i-00000000000000000-dev" and 16
// random hex digits).
func (s *Simulated) ModuleID() string { return s.moduleID }

// Attestation implements NSM with a document in the genuine format.
func (s *Simulated) Attestation(nonce, userData, publicKey []byte) ([]byte, error) {
	if err := checkSizes(nonce, userData, publicKey); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("%w: simulated NSM closed", ErrNSM)
	}
	t := s.now()
	if t.Add(simLeafRenew).After(s.leaf.NotAfter) {
		if err := s.renewLeafLocked(t); err != nil {
			return nil, err
		}
	}
	payload, err := s.payload(t, orNil(nonce), orNil(userData), orNil(publicKey))
	if err != nil {
		return nil, err
	}
	signer, err := cose.NewSigner(cose.AlgorithmES384, s.leafKey)
	if err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	doc, err := cose.Sign1Untagged(rand.Reader, signer, cose.Headers{
		Protected: cose.ProtectedHeader{cose.HeaderLabelAlgorithm: cose.AlgorithmES384},
		// Non-nil so it encodes as the empty map (0xa0) the NSM sends, not null.
		Unprotected: cose.UnprotectedHeader{},
	}, payload, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: simulated NSM: signing: %w", ErrNSM, err)
	}
	return doc, nil
}

// payload encodes the NSM attestation map in the NSM's field order, as an
// indefinite-length map (0xbf ... 0xff) like current NSMs. Absent optional
// fields are null, as the NSM encodes them.
func (s *Simulated) payload(t time.Time, nonce, userData, publicKey []byte) ([]byte, error) {
	fields := []struct {
		key   string
		value any
	}{
		{"module_id", s.moduleID},
		{"digest", "SHA384"},
		{"timestamp", uint64(t.UnixMilli())},
		{"pcrs", s.pcrs},
		{"certificate", s.leaf.Raw},
		{"cabundle", [][]byte{s.rootDER, s.intermediate.Raw}},
		{"public_key", publicKey},
		{"user_data", userData},
		{"nonce", nonce},
	}
	b := []byte{0xbf}
	for _, f := range fields {
		k, err := cbor.Marshal(f.key)
		if err != nil {
			return nil, fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
		}
		v, err := cbor.Marshal(f.value)
		if err != nil {
			return nil, fmt.Errorf("%w: simulated NSM: encoding %s: %w", ErrNSM, f.key, err)
		}
		b = append(append(b, k...), v...)
	}
	return append(b, 0xff), nil
}

// Random implements NSM from crypto/rand.
func (s *Simulated) Random(p []byte) error {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return fmt.Errorf("%w: simulated NSM closed", ErrNSM)
	}
	if _, err := rand.Read(p); err != nil {
		return fmt.Errorf("%w: simulated NSM: %w", ErrNSM, err)
	}
	return nil
}

// SeedKernelEntropy implements Seeder. It does nothing: the simulated NSM's
// randomness comes from the kernel already.
func (s *Simulated) SeedKernelEntropy() error {
	s.log.Debug("simulated NSM: kernel entropy seeding skipped (no NSM entropy source)")
	return nil
}

// Close implements NSM.
func (s *Simulated) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}

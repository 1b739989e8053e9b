// Package signer holds the enclave's signing keys. They are generated at
// start-up (or, for development only, derived from Config.DevKeySeed),
// self-tested, and never leave the process: nothing in this package
// returns, logs or serialises private key material.
package signer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Errors returned by Sign and Key. The gRPC edge maps them to status codes.
var (
	// ErrInvalidArgument: the request is malformed or does not fit the key.
	ErrInvalidArgument = sigalg.ErrInvalid
	// ErrNotFound: no key matches the selector.
	ErrNotFound = errors.New("key not found")
)

// Config chooses which keys the enclave generates.
type Config struct {
	// RSABits is the RSA modulus size: 2048 (default), 3072 or 4096.
	RSABits int
	// ECCCurve is "P-256" (default) or "P-384".
	ECCCurve string
	// Ed25519 also generates an Ed25519 key. Default true (set by the
	// binary's flag; the zero Config has it off).
	Ed25519 bool
	// DevKeySeed, DEVELOPMENT ONLY, derives every key deterministically
	// from this 32-byte secret instead of generating it at random
	// (devkeys.go): the same seed gives the same keys, and so the same key
	// ids, in every enclave and at every start, which lets several
	// enclaves serve one keyset behind one proxy in tests. Anyone who knows
	// the seed has the keys. The enclave refuses it without the simulated
	// NSM and wherever a real NSM exists (package enclave); it is never
	// printed (DevKeySeed). Default none: random keys.
	DevKeySeed DevKeySeed
}

// Validate reports a precise error for an unsupported key size or curve.
func (c Config) Validate() error {
	switch c.rsaBits() {
	case 2048, 3072, 4096:
	default:
		return fmt.Errorf("RSA key size %d: want 2048, 3072 or 4096", c.RSABits)
	}
	switch c.eccCurve() {
	case "P-256", "P-384":
	default:
		return fmt.Errorf("ECC curve %q: want P-256 or P-384", c.ECCCurve)
	}
	// The length only: the seed itself never goes into an error.
	if c.DevKeySeed != nil && len(c.DevKeySeed) != DevKeySeedSize {
		return fmt.Errorf("dev key seed is %d bytes: want %d (%d hex characters)", len(c.DevKeySeed), DevKeySeedSize, 2*DevKeySeedSize)
	}
	return nil
}

// seeded reports whether the keys are derived from DevKeySeed.
func (c Config) seeded() bool { return len(c.DevKeySeed) > 0 }

func (c Config) rsaBits() int {
	if c.RSABits == 0 {
		return 2048
	}
	return c.RSABits
}

func (c Config) eccCurve() string {
	if c.ECCCurve == "" {
		return "P-256"
	}
	return c.ECCCurve
}

// Seeder mixes hardware entropy into the kernel pool before keys are made
// (the NSM inside an enclave). It is optional: without one, keys come from
// crypto/rand as the kernel seeded it.
type Seeder interface {
	SeedKernelEntropy() error
}

// key is one signing key. priv never leaves this package.
type key struct {
	info *pb.KeyInfo
	pub  crypto.PublicKey
	priv crypto.Signer
	// took is how long generation and the self-test took.
	took time.Duration
}

// Signer signs with the enclave's keys. It is immutable after New and safe
// for concurrent use.
type Signer struct {
	keys   []*key // sorted by key id
	byType map[pb.KeyType]*key
	byID   map[string]*key
}

// Params are New's dependencies.
type Params struct {
	fx.In

	Config Config
	Logger *zap.Logger
	Seeder Seeder `optional:"true"`
}

// Module provides *Signer.
var Module = fx.Module("signer", fx.Provide(New))

// New seeds entropy (when a Seeder is given), generates the keys, and
// self-tests each of them: every algorithm the key accepts signs a known
// message and the signature verifies against the public key. Any failure is
// returned, and the enclave does not start.
func New(p Params) (*Signer, error) {
	if err := p.Config.Validate(); err != nil {
		return nil, err
	}
	log := p.Logger.Named("signer")
	if p.Seeder != nil {
		if err := p.Seeder.SeedKernelEntropy(); err != nil {
			return nil, fmt.Errorf("seed entropy: %w", err)
		}
	}
	seed := p.Config.DevKeySeed
	if p.Config.seeded() {
		log.Warn("DEVELOPMENT ONLY: keys derived from --dev-key-seed: anyone who knows the seed has the keys. " +
			"Never use it outside development; a real enclave refuses it.")
	}
	curve, curveName := elliptic.P256(), p.Config.eccCurve()
	if curveName == "P-384" {
		curve = elliptic.P384()
	}
	type gen struct {
		typ pb.KeyType
		fn  func() (crypto.Signer, error)
	}
	gens := []gen{
		{pb.KeyType_KEY_TYPE_RSA, func() (crypto.Signer, error) {
			if p.Config.seeded() {
				return deriveRSA(seed, p.Config.rsaBits())
			}
			return rsa.GenerateKey(rand.Reader, p.Config.rsaBits())
		}},
		{pb.KeyType_KEY_TYPE_ECC, func() (crypto.Signer, error) {
			if p.Config.seeded() {
				return deriveECDSA(seed, curve, curveName)
			}
			return ecdsa.GenerateKey(curve, rand.Reader)
		}},
	}
	if p.Config.Ed25519 {
		gens = append(gens, gen{pb.KeyType_KEY_TYPE_ED25519, func() (crypto.Signer, error) {
			if p.Config.seeded() {
				return deriveEd25519(seed)
			}
			_, k, err := ed25519.GenerateKey(rand.Reader)
			return k, err
		}})
	}
	s := &Signer{byType: map[pb.KeyType]*key{}, byID: map[string]*key{}}
	for _, g := range gens {
		start := time.Now()
		priv, err := g.fn()
		if err != nil {
			return nil, fmt.Errorf("generate %s key: %w", sigalg.TypeName(g.typ), err)
		}
		k, err := newKey(g.typ, priv, start)
		if err != nil {
			return nil, err
		}
		if err := k.selfTest(); err != nil {
			return nil, err
		}
		k.took = time.Since(start)
		s.keys = append(s.keys, k)
		s.byType[g.typ] = k
		s.byID[k.info.KeyId] = k
		fields := []zap.Field{
			zap.String("key_id", k.info.KeyId),
			zap.String("key_spec", sigalg.SpecName(k.info.KeySpec)),
			zap.Duration("generate_and_self_test", k.took),
		}
		if p.Config.seeded() {
			fields = append(fields, zap.String("origin", "dev-key-seed"))
		}
		log.Info("key ready", fields...)
	}
	sort.Slice(s.keys, func(i, j int) bool { return s.keys[i].info.KeyId < s.keys[j].info.KeyId })
	return s, nil
}

func newKey(typ pb.KeyType, priv crypto.Signer, created time.Time) (*key, error) {
	pub := priv.Public()
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encode %s public key: %w", sigalg.TypeName(typ), err)
	}
	spec, err := sigalg.SpecOf(pub)
	if err != nil {
		return nil, err
	}
	algs := sigalg.ForKey(spec)
	return &key{
		info: &pb.KeyInfo{
			KeyId:                   KeyID(spki),
			KeyType:                 typ,
			KeySpec:                 spec,
			PublicKey:               spki,
			SigningAlgorithms:       algs,
			DefaultSigningAlgorithm: algs[0],
			CreateTime:              timestamppb.New(created),
		},
		pub:  pub,
		priv: priv,
	}, nil
}

// selfTestMessage is signed by every key and algorithm at start-up.
var selfTestMessage = []byte("nitrosign start-up self-test")

func (k *key) selfTest() error {
	for _, alg := range k.info.SigningAlgorithms {
		digest, err := sigalg.Digest(alg, pb.MessageType_MESSAGE_TYPE_RAW, selfTestMessage)
		if err != nil {
			return fmt.Errorf("self-test of key %s with %s: %w", k.info.KeyId, sigalg.Name(alg), err)
		}
		sig, err := sigalg.Sign(rand.Reader, k.priv, alg, digest)
		if err != nil {
			return fmt.Errorf("self-test of key %s with %s: sign: %w", k.info.KeyId, sigalg.Name(alg), err)
		}
		if err := sigalg.Verify(k.pub, alg, pb.MessageType_MESSAGE_TYPE_RAW, selfTestMessage, sig); err != nil {
			return fmt.Errorf("self-test of key %s with %s: %w", k.info.KeyId, sigalg.Name(alg), err)
		}
	}
	return nil
}

// KeyID is the id of a key: lower-case hex of SHA-256 over its DER SPKI, so
// anyone holding the public key can recompute it.
func KeyID(spki []byte) string {
	sum := sha256.Sum256(spki)
	return hex.EncodeToString(sum[:])
}

// Keys returns a copy of every key's public description, sorted by key id.
func (s *Signer) Keys() []*pb.KeyInfo {
	out := make([]*pb.KeyInfo, len(s.keys))
	for i, k := range s.keys {
		out[i] = proto.Clone(k.info).(*pb.KeyInfo)
	}
	return out
}

// GenerationTimes returns, by key id, how long each key took to generate
// and self-test at start-up.
func (s *Signer) GenerationTimes() map[string]time.Duration {
	out := make(map[string]time.Duration, len(s.keys))
	for _, k := range s.keys {
		out[k.info.KeyId] = k.took
	}
	return out
}

// Key returns the public description of the selected key.
func (s *Signer) Key(sel *pb.KeySelector) (*pb.KeyInfo, error) {
	k, err := s.find(sel)
	if err != nil {
		return nil, err
	}
	return proto.Clone(k.info).(*pb.KeyInfo), nil
}

func (s *Signer) find(sel *pb.KeySelector) (*key, error) {
	switch v := sel.GetSelector().(type) {
	case *pb.KeySelector_KeyType:
		t := v.KeyType
		if _, known := pb.KeyType_name[int32(t)]; !known {
			return nil, fmt.Errorf("%w: unknown key_type %d (want KEY_TYPE_RSA, KEY_TYPE_ECC or KEY_TYPE_ED25519)", ErrInvalidArgument, int32(t))
		}
		if t == pb.KeyType_KEY_TYPE_UNSPECIFIED {
			return nil, fmt.Errorf("%w: key.key_type is KEY_TYPE_UNSPECIFIED; name KEY_TYPE_RSA, KEY_TYPE_ECC or KEY_TYPE_ED25519", ErrInvalidArgument)
		}
		k, ok := s.byType[t]
		if !ok {
			return nil, fmt.Errorf("%w: this enclave has no %s key", ErrNotFound, sigalg.TypeName(t))
		}
		return k, nil
	case *pb.KeySelector_KeyId:
		id := v.KeyId
		if !validKeyID(id) {
			return nil, fmt.Errorf("%w: key.key_id must be 64 lower-case hex characters (SHA-256 of the DER public key), got %d characters", ErrInvalidArgument, len(id))
		}
		k, ok := s.byID[id]
		if !ok {
			return nil, fmt.Errorf("%w: no key with id %s", ErrNotFound, id)
		}
		return k, nil
	default:
		return nil, fmt.Errorf("%w: key is required: set key.key_type or key.key_id", ErrInvalidArgument)
	}
}

func validKeyID(id string) bool {
	if len(id) != 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// Signature is the result of Sign.
type Signature struct {
	KeyID     string
	KeyType   pb.KeyType
	Algorithm pb.SigningAlgorithm
	Bytes     []byte
}

// Sign signs req.Message with the selected key. Every caller mistake wraps
// ErrInvalidArgument or ErrNotFound and names the offending field; the
// message bytes never appear in an error.
func (s *Signer) Sign(ctx context.Context, req *pb.SignRequest) (*Signature, error) {
	k, err := s.find(req.GetKey())
	if err != nil {
		return nil, err
	}
	alg := req.GetSigningAlgorithm()
	if _, known := pb.SigningAlgorithm_name[int32(alg)]; !known {
		return nil, fmt.Errorf("%w: unknown signing_algorithm %d", ErrInvalidArgument, int32(alg))
	}
	if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED {
		alg = k.info.DefaultSigningAlgorithm
	}
	if !sigalg.Fits(k.info.KeySpec, alg) {
		return nil, fmt.Errorf("%w: signing_algorithm %s does not fit key %s (%s); it accepts %s",
			ErrInvalidArgument, sigalg.Name(alg), k.info.KeyId, sigalg.SpecName(k.info.KeySpec), algNames(k.info.SigningAlgorithms))
	}
	digest, err := sigalg.Digest(alg, req.GetMessageType(), req.GetMessage())
	if err != nil {
		return nil, err
	}
	// Signing is CPU-bound and not interruptible: do not start it for a
	// caller that has already gone.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	sig, err := sigalg.Sign(rand.Reader, k.priv, alg, digest)
	if err != nil {
		return nil, fmt.Errorf("sign with key %s (%s): %w", k.info.KeyId, sigalg.Name(alg), err)
	}
	return &Signature{KeyID: k.info.KeyId, KeyType: k.info.KeyType, Algorithm: alg, Bytes: sig}, nil
}

func algNames(algs []pb.SigningAlgorithm) string {
	s := ""
	for i, a := range algs {
		if i > 0 {
			s += ", "
		}
		s += sigalg.Name(a)
	}
	return s
}

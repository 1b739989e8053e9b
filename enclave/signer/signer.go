// Package signer holds the enclave's signing keys and signs with them.
// With ephemeral keys (the default) they are generated at start-up (or,
// for development only, derived from Config.DevKeySeed); with sealed keys
// the keyset manager (package keyset) installs the keys it unsealed, and
// again after every rotation. Every key is self-tested before it signs.
// Nothing in this package returns, logs or serialises private key
// material: the keyset manager, which seals it, holds its own copy.
package signer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"sort"
	"sync/atomic"
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
	// ErrDisabled: the selected key is disabled (KeyAdminService).
	ErrDisabled = errors.New("key disabled")
	// ErrNotReady: no keys yet (a sealed keyset not unsealed yet); the
	// error says why.
	ErrNotReady = errors.New("keys not ready")
)

// Key modes (Config.KeyMode).
const (
	// Ephemeral keys are generated at every start and never stored.
	Ephemeral = "ephemeral"
	// Sealed keys come from a keyset sealed with AWS KMS (package keyset).
	Sealed = "sealed"
)

// Config chooses which keys the enclave generates.
type Config struct {
	// KeyMode is Ephemeral (default: new keys at every start) or Sealed
	// (the keys of a KMS-sealed keyset, installed by package keyset).
	KeyMode string
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
	switch c.KeyMode {
	case "", Ephemeral:
	case Sealed:
		if c.DevKeySeed != nil {
			return errors.New("a dev key seed derives ephemeral keys: it cannot be used with --key-mode sealed")
		}
	default:
		return fmt.Errorf("key mode %q: want %s or %s", c.KeyMode, Ephemeral, Sealed)
	}
	// The length only: the seed itself never goes into an error.
	if c.DevKeySeed != nil && len(c.DevKeySeed) != DevKeySeedSize {
		return fmt.Errorf("dev key seed is %d bytes: want %d (%d hex characters)", len(c.DevKeySeed), DevKeySeedSize, 2*DevKeySeedSize)
	}
	return nil
}

// IsSealed reports whether the keys come from a sealed keyset.
func (c Config) IsSealed() bool { return c.KeyMode == Sealed }

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

// keyring is one immutable set of keys; Install swaps in a new one.
type keyring struct {
	keys   []*key // sorted by key id
	byType map[pb.KeyType]*key
	byID   map[string]*key
	// ticketKey seals callers' session tickets (SessionTicketKey).
	ticketKey *[32]byte
}

// ticketKeyInfo is the HKDF info of the session ticket key.
const ticketKeyInfo = "nitrosign-session-ticket-key-v1"

// deriveTicketKey derives the session ticket key from the keyset's oldest
// key (the earliest created; the smallest id of those created at once).
// Keys are disabled, never removed, so it stays the same through every
// rotation, and every enclave that holds the keyset derives the same.
func (r *keyring) deriveTicketKey() error {
	first := r.keys[0]
	for _, k := range r.keys[1:] {
		a, b := k.info.GetCreateTime().AsTime(), first.info.GetCreateTime().AsTime()
		if a.Before(b) || (a.Equal(b) && k.info.KeyId < first.info.KeyId) {
			first = k
		}
	}
	der, err := x509.MarshalPKCS8PrivateKey(first.priv)
	if err != nil {
		return fmt.Errorf("derive the session ticket key: %w", err)
	}
	defer clear(der)
	k, err := hkdf.Key(sha256.New, der, nil, ticketKeyInfo, 32)
	if err != nil {
		return fmt.Errorf("derive the session ticket key: %w", err)
	}
	r.ticketKey = (*[32]byte)(k)
	return nil
}

// SessionTicketKey returns the key that seals callers' session tickets: a
// secret derived (HKDF-SHA256, its own info) from the keyset's oldest
// private key, so that every enclave with the same keyset accepts the
// same tickets, across restarts and rotations, and an enclave with other
// keys accepts none. The same pointer is returned until the keys change.
// The caller must not modify it.
func (s *Signer) SessionTicketKey() (*[32]byte, error) {
	r, err := s.keys()
	if err != nil {
		return nil, err
	}
	return r.ticketKey, nil
}

// Signer signs with the enclave's keys. It is safe for concurrent use: a
// call uses the keys that were installed when it started.
type Signer struct {
	ring     atomic.Pointer[keyring]
	notReady atomic.Pointer[string] // why there are no keys; nil once installed
}

// Key is one key to install (package keyset, from a sealed keyset).
type Key struct {
	Type     pb.KeyType
	Version  int
	Disabled bool
	Created  time.Time
	Private  crypto.Signer
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
	if p.Config.IsSealed() {
		s := &Signer{}
		s.SetNotReady("the sealed keyset is not unsealed yet")
		return s, nil
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
	// generate makes a key of typ: Generate's, or derived from the seed.
	generate := func(typ pb.KeyType) (crypto.Signer, error) {
		if !p.Config.seeded() {
			return Generate(p.Config, typ)
		}
		switch typ {
		case pb.KeyType_KEY_TYPE_RSA:
			return deriveRSA(seed, p.Config.rsaBits())
		case pb.KeyType_KEY_TYPE_ECC:
			return deriveECDSA(seed, curve, curveName)
		default:
			return deriveEd25519(seed)
		}
	}
	ring := &keyring{byType: map[pb.KeyType]*key{}, byID: map[string]*key{}}
	for _, typ := range Types(p.Config) {
		start := time.Now()
		priv, err := generate(typ)
		if err != nil {
			return nil, fmt.Errorf("generate %s key: %w", sigalg.TypeName(typ), err)
		}
		k, err := newKey(Key{Type: typ, Version: 1, Created: start, Private: priv})
		if err != nil {
			return nil, err
		}
		if err := k.selfTest(); err != nil {
			return nil, err
		}
		k.took = time.Since(start)
		k.info.TypeDefault = true
		ring.keys = append(ring.keys, k)
		ring.byType[typ] = k
		ring.byID[k.info.KeyId] = k
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
	sort.Slice(ring.keys, func(i, j int) bool { return ring.keys[i].info.KeyId < ring.keys[j].info.KeyId })
	if err := ring.deriveTicketKey(); err != nil {
		return nil, err
	}
	s := &Signer{}
	s.ring.Store(ring)
	return s, nil
}

// Generate makes a new private key of type typ with c's size or curve
// (never from a dev key seed): package keyset's new keys.
func Generate(c Config, typ pb.KeyType) (crypto.Signer, error) {
	switch typ {
	case pb.KeyType_KEY_TYPE_RSA:
		return rsa.GenerateKey(rand.Reader, c.rsaBits())
	case pb.KeyType_KEY_TYPE_ECC:
		curve := elliptic.P256()
		if c.eccCurve() == "P-384" {
			curve = elliptic.P384()
		}
		return ecdsa.GenerateKey(curve, rand.Reader)
	case pb.KeyType_KEY_TYPE_ED25519:
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	}
	return nil, fmt.Errorf("%w: key type %s cannot be generated", ErrInvalidArgument, sigalg.TypeName(typ))
}

// Types lists the key types c makes in a new keyset.
func Types(c Config) []pb.KeyType {
	t := []pb.KeyType{pb.KeyType_KEY_TYPE_RSA, pb.KeyType_KEY_TYPE_ECC}
	if c.Ed25519 {
		t = append(t, pb.KeyType_KEY_TYPE_ED25519)
	}
	return t
}

// SetNotReady removes every key: Sign, Key and Keys answer ErrNotReady
// with reason until the next Install. Package keyset says why (the
// sealed keyset not loaded yet, KMS refused, ...).
func (s *Signer) SetNotReady(reason string) {
	s.notReady.Store(&reason)
	s.ring.Store(nil)
}

// NotReady returns why there are no keys, or "" when there are.
func (s *Signer) NotReady() string {
	if r := s.notReady.Load(); r != nil && s.ring.Load() == nil {
		return *r
	}
	return ""
}

// Install self-tests keys and, when every enabled one passes, makes them
// the keys the signer uses, at once for the calls that start after it.
// The newest enabled version of each type becomes its default. An error
// leaves the keys in use as they were.
func (s *Signer) Install(keys []Key) error {
	if len(keys) == 0 {
		return errors.New("install: no keys")
	}
	ring := &keyring{byType: map[pb.KeyType]*key{}, byID: map[string]*key{}}
	for _, in := range keys {
		if in.Private == nil {
			return errors.New("install: a key without its private half")
		}
		start := time.Now()
		k, err := newKey(in)
		if err != nil {
			return err
		}
		if _, dup := ring.byID[k.info.KeyId]; dup {
			return fmt.Errorf("install: key %s twice", k.info.KeyId)
		}
		// A disabled key is tested too: it may be enabled again.
		if err := k.selfTest(); err != nil {
			return err
		}
		k.took = time.Since(start)
		ring.keys = append(ring.keys, k)
		ring.byID[k.info.KeyId] = k
		if d := ring.byType[in.Type]; !in.Disabled && (d == nil || in.Version > int(d.info.Version)) {
			ring.byType[in.Type] = k
		}
	}
	for _, k := range ring.byType {
		k.info.TypeDefault = true
	}
	sort.Slice(ring.keys, func(i, j int) bool { return ring.keys[i].info.KeyId < ring.keys[j].info.KeyId })
	if err := ring.deriveTicketKey(); err != nil {
		return err
	}
	s.ring.Store(ring)
	return nil
}

func newKey(in Key) (*key, error) {
	typ, priv := in.Type, in.Private
	if in.Version < 1 || in.Version > math.MaxUint32 {
		return nil, fmt.Errorf("install: %s key version %d", sigalg.TypeName(typ), in.Version)
	}
	state := pb.KeyState_KEY_STATE_ENABLED
	if in.Disabled {
		state = pb.KeyState_KEY_STATE_DISABLED
	}
	pub := priv.Public()
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("encode %s public key: %w", sigalg.TypeName(typ), err)
	}
	spec, err := sigalg.SpecOf(pub)
	if err != nil {
		return nil, err
	}
	if t := typeOf(spec); t != typ {
		return nil, fmt.Errorf("install: a %s key given as %s", sigalg.SpecName(spec), sigalg.TypeName(typ))
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
			CreateTime:              timestamppb.New(in.Created),
			KeyState:                state,
			Version:                 uint32(in.Version),
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

// typeOf is the type of a key spec.
func typeOf(spec pb.KeySpec) pb.KeyType {
	switch spec {
	case pb.KeySpec_KEY_SPEC_RSA_2048, pb.KeySpec_KEY_SPEC_RSA_3072, pb.KeySpec_KEY_SPEC_RSA_4096:
		return pb.KeyType_KEY_TYPE_RSA
	case pb.KeySpec_KEY_SPEC_ECC_NIST_P256, pb.KeySpec_KEY_SPEC_ECC_NIST_P384:
		return pb.KeyType_KEY_TYPE_ECC
	case pb.KeySpec_KEY_SPEC_ECC_NIST_EDWARDS25519:
		return pb.KeyType_KEY_TYPE_ED25519
	}
	return pb.KeyType_KEY_TYPE_UNSPECIFIED
}

// Keys returns a copy of every key's public description, enabled or not,
// sorted by key id; none while the keys are not ready.
func (s *Signer) Keys() []*pb.KeyInfo {
	r := s.ring.Load()
	if r == nil {
		return nil
	}
	out := make([]*pb.KeyInfo, len(r.keys))
	for i, k := range r.keys {
		out[i] = proto.Clone(k.info).(*pb.KeyInfo)
	}
	return out
}

// EnabledKeys is Keys without the disabled ones: what attestation commits
// to.
func (s *Signer) EnabledKeys() []*pb.KeyInfo {
	all := s.Keys()
	out := all[:0]
	for _, k := range all {
		if k.GetKeyState() != pb.KeyState_KEY_STATE_DISABLED {
			out = append(out, k)
		}
	}
	return out
}

// GenerationTimes returns, by key id, how long each key took to generate
// (or, installed, to parse) and self-test.
func (s *Signer) GenerationTimes() map[string]time.Duration {
	r := s.ring.Load()
	if r == nil {
		return nil
	}
	out := make(map[string]time.Duration, len(r.keys))
	for _, k := range r.keys {
		out[k.info.KeyId] = k.took
	}
	return out
}

// Key returns the public description of the selected key: by id, a
// disabled key too (its public key still verifies what it signed).
func (s *Signer) Key(sel *pb.KeySelector) (*pb.KeyInfo, error) {
	k, err := s.find(sel)
	if err != nil {
		return nil, err
	}
	return proto.Clone(k.info).(*pb.KeyInfo), nil
}

// ring returns the keys in use, or ErrNotReady with its reason.
func (s *Signer) keys() (*keyring, error) {
	if r := s.ring.Load(); r != nil {
		return r, nil
	}
	reason := "no keys"
	if p := s.notReady.Load(); p != nil {
		reason = *p
	}
	return nil, fmt.Errorf("%w: %s", ErrNotReady, reason)
}

func (s *Signer) find(sel *pb.KeySelector) (*key, error) {
	// The selector is checked first: a malformed request is the caller's
	// mistake whether or not keys are loaded.
	switch v := sel.GetSelector().(type) {
	case *pb.KeySelector_KeyType:
		t := v.KeyType
		if _, known := pb.KeyType_name[int32(t)]; !known {
			return nil, fmt.Errorf("%w: unknown key_type %d (want KEY_TYPE_RSA, KEY_TYPE_ECC or KEY_TYPE_ED25519)", ErrInvalidArgument, int32(t))
		}
		if t == pb.KeyType_KEY_TYPE_UNSPECIFIED {
			return nil, fmt.Errorf("%w: key.key_type is KEY_TYPE_UNSPECIFIED; name KEY_TYPE_RSA, KEY_TYPE_ECC or KEY_TYPE_ED25519", ErrInvalidArgument)
		}
	case *pb.KeySelector_KeyId:
		if !validKeyID(v.KeyId) {
			return nil, fmt.Errorf("%w: key.key_id must be 64 lower-case hex characters (SHA-256 of the DER public key), got %d characters", ErrInvalidArgument, len(v.KeyId))
		}
	default:
		return nil, fmt.Errorf("%w: key is required: set key.key_type or key.key_id", ErrInvalidArgument)
	}
	r, err := s.keys()
	if err != nil {
		return nil, err
	}
	switch v := sel.GetSelector().(type) {
	case *pb.KeySelector_KeyType:
		k, ok := r.byType[v.KeyType]
		if !ok {
			return nil, fmt.Errorf("%w: this enclave has no enabled %s key", ErrNotFound, sigalg.TypeName(v.KeyType))
		}
		return k, nil
	default:
		id := sel.GetKeyId()
		k, ok := r.byID[id]
		if !ok {
			return nil, fmt.Errorf("%w: no key with id %s", ErrNotFound, id)
		}
		return k, nil
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
	if k.info.KeyState == pb.KeyState_KEY_STATE_DISABLED {
		return nil, fmt.Errorf("%w: key %s is disabled; enable it (KeyAdminService.EnableKey) or sign with another key", ErrDisabled, k.info.KeyId)
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

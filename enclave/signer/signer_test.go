package signer

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

var (
	defaultOnce   sync.Once
	defaultSigner *Signer
	defaultErr    error
)

// testSigner returns one shared signer with default keys (RSA-2048, P-256,
// Ed25519); key generation is the slow part of these tests.
func testSigner(t *testing.T) *Signer {
	t.Helper()
	defaultOnce.Do(func() {
		defaultSigner, defaultErr = New(Params{Config: Config{Ed25519: true}, Logger: zap.NewNop()})
	})
	if defaultErr != nil {
		t.Fatal(defaultErr)
	}
	return defaultSigner
}

func byType(t pb.KeyType) *pb.KeySelector {
	return &pb.KeySelector{Selector: &pb.KeySelector_KeyType{KeyType: t}}
}

func byID(id string) *pb.KeySelector {
	return &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: id}}
}

func pubOf(t *testing.T, k *pb.KeyInfo) crypto.PublicKey {
	t.Helper()
	pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if got := KeyID(k.PublicKey); got != k.KeyId {
		t.Fatalf("key id %s is not SHA-256 of the SPKI (%s)", k.KeyId, got)
	}
	return pub
}

// TestSignEveryKeyAlgorithmMessageType signs with every key, every algorithm
// it accepts and both message types, and verifies each signature with the
// standard library against the served SPKI. RAW and DIGEST of the same
// message must give signatures that verify for the same message.
func TestSignEveryKeyAlgorithmMessageType(t *testing.T) {
	configs := []Config{
		{Ed25519: true},
		{RSABits: 3072, ECCCurve: "P-384"},
		{RSABits: 4096},
	}
	if testing.Short() {
		configs = configs[:1]
	}
	msg := []byte("the quick brown fox jumps over the lazy dog")
	for _, cfg := range configs {
		s := testSigner(t)
		if cfg.RSABits != 0 {
			var err error
			s, err = New(Params{Config: cfg, Logger: zap.NewNop()})
			if err != nil {
				t.Fatal(err)
			}
		}
		for _, k := range s.Keys() {
			pub := pubOf(t, k)
			for _, alg := range k.SigningAlgorithms {
				t.Run(sigalg.SpecName(k.KeySpec)+"/"+sigalg.Name(alg), func(t *testing.T) {
					h, _ := sigalg.Hash(alg)
					hh := h.New()
					hh.Write(msg)
					digest := hh.Sum(nil)
					for _, sel := range []*pb.KeySelector{byType(k.KeyType), byID(k.KeyId)} {
						raw, err := s.Sign(context.Background(), &pb.SignRequest{Key: sel, Message: msg, MessageType: pb.MessageType_MESSAGE_TYPE_RAW, SigningAlgorithm: alg})
						if err != nil {
							t.Fatal(err)
						}
						if raw.KeyID != k.KeyId || raw.Algorithm != alg {
							t.Fatalf("got key %s alg %s", raw.KeyID, sigalg.Name(raw.Algorithm))
						}
						if err := sigalg.Verify(pub, alg, pb.MessageType_MESSAGE_TYPE_RAW, msg, raw.Bytes); err != nil {
							t.Fatalf("RAW signature: %v", err)
						}
						if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512 {
							continue // pure Ed25519 takes no digest
						}
						dig, err := s.Sign(context.Background(), &pb.SignRequest{Key: sel, Message: digest, MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST, SigningAlgorithm: alg})
						if err != nil {
							t.Fatal(err)
						}
						// A DIGEST signature verifies as a signature over the message.
						if err := sigalg.Verify(pub, alg, pb.MessageType_MESSAGE_TYPE_RAW, msg, dig.Bytes); err != nil {
							t.Fatalf("DIGEST signature over the message: %v", err)
						}
						// Tampering is caught.
						bad := append([]byte(nil), msg...)
						bad[0] ^= 1
						if err := sigalg.Verify(pub, alg, pb.MessageType_MESSAGE_TYPE_RAW, bad, dig.Bytes); !errors.Is(err, sigalg.ErrBadSignature) {
							t.Fatalf("tampered message: got %v, want ErrBadSignature", err)
						}
					}
				})
			}
		}
	}
}

func TestDefaultAlgorithmAndKeys(t *testing.T) {
	s := testSigner(t)
	keys := s.Keys()
	if len(keys) != 3 {
		t.Fatalf("got %d keys, want 3", len(keys))
	}
	want := map[pb.KeyType]pb.SigningAlgorithm{
		pb.KeyType_KEY_TYPE_RSA:     pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_256,
		pb.KeyType_KEY_TYPE_ECC:     pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256,
		pb.KeyType_KEY_TYPE_ED25519: pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512,
	}
	for i, k := range keys {
		if i > 0 && keys[i-1].KeyId >= k.KeyId {
			t.Fatal("keys are not sorted by id")
		}
		if k.DefaultSigningAlgorithm != want[k.KeyType] {
			t.Errorf("%s default %s", sigalg.TypeName(k.KeyType), sigalg.Name(k.DefaultSigningAlgorithm))
		}
		sig, err := s.Sign(context.Background(), &pb.SignRequest{Key: byType(k.KeyType), Message: []byte("m")})
		if err != nil {
			t.Fatal(err)
		}
		if sig.Algorithm != want[k.KeyType] {
			t.Errorf("no algorithm given: signed with %s", sigalg.Name(sig.Algorithm))
		}
	}
	// Keys returns copies: a caller cannot change the signer's state.
	keys[0].PublicKey[0] ^= 0xff
	if s.Keys()[0].PublicKey[0] == keys[0].PublicKey[0] {
		t.Fatal("Keys exposes internal state")
	}
}

func TestSignInvalid(t *testing.T) {
	s := testSigner(t)
	ecc, _ := s.Key(byType(pb.KeyType_KEY_TYPE_ECC))
	d32 := make([]byte, 32)
	tests := []struct {
		name string
		req  *pb.SignRequest
		want error
		msg  string
	}{
		{"no key", &pb.SignRequest{Message: []byte("m")}, ErrInvalidArgument, "key is required"},
		{"empty selector", &pb.SignRequest{Key: &pb.KeySelector{}, Message: []byte("m")}, ErrInvalidArgument, "key is required"},
		{"unspecified key type", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_UNSPECIFIED), Message: []byte("m")}, ErrInvalidArgument, "KEY_TYPE_UNSPECIFIED"},
		{"unknown key type", &pb.SignRequest{Key: byType(99), Message: []byte("m")}, ErrInvalidArgument, "unknown key_type 99"},
		{"malformed key id", &pb.SignRequest{Key: byID("abc"), Message: []byte("m")}, ErrInvalidArgument, "64 lower-case hex"},
		{"upper-case key id", &pb.SignRequest{Key: byID(strings.ToUpper(ecc.KeyId)), Message: []byte("m")}, ErrInvalidArgument, "64 lower-case hex"},
		{"unknown key id", &pb.SignRequest{Key: byID(strings.Repeat("0", 64)), Message: []byte("m")}, ErrNotFound, "no key with id"},
		{"empty message", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC)}, ErrInvalidArgument, "message is empty"},
		{"oversized raw", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC), Message: make([]byte, 4097)}, ErrInvalidArgument, "at most 4096"},
		{"unknown algorithm", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC), Message: []byte("m"), SigningAlgorithm: 77}, ErrInvalidArgument, "unknown signing_algorithm 77"},
		{"unknown message type", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC), Message: []byte("m"), MessageType: 5}, ErrInvalidArgument, "unknown message type 5"},
		{"ecdsa-384 on P-256", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC), Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_384}, ErrInvalidArgument, "does not fit key"},
		{"rsa alg on ecc", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC), Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256}, ErrInvalidArgument, "does not fit key"},
		{"ecdsa on rsa", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_RSA), Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256}, ErrInvalidArgument, "does not fit key"},
		{"ed25519 alg on rsa", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_RSA), Message: []byte("m"), SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512}, ErrInvalidArgument, "does not fit key"},
		{"short digest", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC), Message: d32[:31], MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST}, ErrInvalidArgument, "must be 32 bytes"},
		{"long digest", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_RSA), Message: d32, MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST, SigningAlgorithm: pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_512}, ErrInvalidArgument, "must be 64 bytes"},
		{"empty digest", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ECC), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST}, ErrInvalidArgument, "must be 32 bytes"},
		{"digest for pure ed25519", &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ED25519), Message: make([]byte, 64), MessageType: pb.MessageType_MESSAGE_TYPE_DIGEST}, ErrInvalidArgument, "ED25519_PH_SHA_512"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.Sign(context.Background(), tt.req)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("error %q does not say %q", err, tt.msg)
			}
		})
	}
}

func TestMissingKeyType(t *testing.T) {
	s, err := New(Params{Config: Config{}, Logger: zap.NewNop()}) // no Ed25519
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Sign(context.Background(), &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_ED25519), Message: []byte("m")})
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
}

func TestCanceledContext(t *testing.T) {
	s := testSigner(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Sign(ctx, &pb.SignRequest{Key: byType(pb.KeyType_KEY_TYPE_RSA), Message: []byte("m")}); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []Config{{RSABits: 1024}, {RSABits: 8192}, {ECCCurve: "P-521"}, {ECCCurve: "secp256k1"}} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: want error", c)
		}
		if _, err := New(Params{Config: c, Logger: zap.NewNop()}); err == nil {
			t.Errorf("New(%+v): want error", c)
		}
	}
}

type seederFunc func() error

func (f seederFunc) SeedKernelEntropy() error { return f() }

func TestSeeder(t *testing.T) {
	called := false
	if _, err := New(Params{Logger: zap.NewNop(), Seeder: seederFunc(func() error { called = true; return nil })}); err != nil {
		t.Fatal(err)
	}
	if !called {
		t.Fatal("seeder not called before key generation")
	}
	if _, err := New(Params{Logger: zap.NewNop(), Seeder: seederFunc(func() error { return errors.New("nsm down") })}); err == nil || !strings.Contains(err.Error(), "nsm down") {
		t.Fatalf("seeder failure not reported: %v", err)
	}
}

// TestNoKeyMaterialInLogs checks that start-up logs carry ids and specs only.
func TestNoKeyMaterialInLogs(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	s, err := New(Params{Config: Config{Ed25519: true}, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	if logs.Len() != len(s.Keys()) {
		t.Fatalf("%d log lines for %d keys", logs.Len(), len(s.Keys()))
	}
	for _, e := range logs.All() {
		for name := range e.ContextMap() {
			switch name {
			case "key_id", "key_spec", "generate_and_self_test":
			default:
				t.Errorf("unexpected log field %q", name)
			}
		}
	}
}

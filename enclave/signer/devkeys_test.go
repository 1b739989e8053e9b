package signer

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// testSeed is 00 01 02 ... 1f.
func testSeed() DevKeySeed {
	s := make(DevKeySeed, DevKeySeedSize)
	for i := range s {
		s[i] = byte(i)
	}
	return s
}

func randomSeed(t *testing.T) DevKeySeed {
	t.Helper()
	s := make(DevKeySeed, DevKeySeedSize)
	if _, err := rand.Read(s); err != nil {
		t.Fatal(err)
	}
	return s
}

func seededSigner(t *testing.T, c Config) (*Signer, []observer.LoggedEntry) {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	s, err := New(Params{Config: c, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	return s, logs.All()
}

func keyIDs(s *Signer) map[pb.KeyType]string {
	out := map[pb.KeyType]string{}
	for _, k := range s.Keys() {
		out[k.KeyType] = k.KeyId
	}
	return out
}

// Two signers given the same seed serve the same keys (what lets several
// enclaves serve one keyset); another seed gives other keys, of every type.
func TestDevKeySeedSameSeedSameKeys(t *testing.T) {
	seed := randomSeed(t)
	a, _ := seededSigner(t, Config{Ed25519: true, DevKeySeed: seed})
	b, _ := seededSigner(t, Config{Ed25519: true, DevKeySeed: bytes.Clone(seed)})
	ka, kb := a.Keys(), b.Keys()
	if len(ka) != 3 || len(kb) != 3 {
		t.Fatalf("%d and %d keys, want 3", len(ka), len(kb))
	}
	for i := range ka {
		if ka[i].KeyId != kb[i].KeyId || !bytes.Equal(ka[i].PublicKey, kb[i].PublicKey) {
			t.Fatalf("same seed, different %s key: %s and %s", sigalg.TypeName(ka[i].KeyType), ka[i].KeyId, kb[i].KeyId)
		}
	}
	// Signatures of one verify with the other's public key.
	for _, k := range kb {
		sig, err := a.Sign(t.Context(), &pb.SignRequest{Key: byID(k.KeyId), Message: []byte("one keyset")})
		if err != nil {
			t.Fatal(err)
		}
		if err := sigalg.Verify(pubOf(t, k), sig.Algorithm, pb.MessageType_MESSAGE_TYPE_RAW, []byte("one keyset"), sig.Bytes); err != nil {
			t.Fatalf("%s: %v", sigalg.TypeName(k.KeyType), err)
		}
	}

	other := bytes.Clone(seed)
	other[DevKeySeedSize-1] ^= 1 // one bit
	c, _ := seededSigner(t, Config{Ed25519: true, DevKeySeed: other})
	idsA, idsC := keyIDs(a), keyIDs(c)
	for typ, id := range idsA {
		if idsC[typ] == id {
			t.Errorf("seeds one bit apart give the same %s key %s", sigalg.TypeName(typ), id)
		}
	}
	// And random keys are never the seeded ones.
	for typ, id := range keyIDs(testSigner(t)) {
		if idsA[typ] == id {
			t.Errorf("random and seeded %s keys are the same", sigalg.TypeName(typ))
		}
	}
	t.Logf("seeded key ids: %v", idsA)
}

// The derivation is pinned: a change to it changes key ids that
// development setups and tests may hold, so it must be deliberate (and
// change devKeyVersion). The expected values were computed independently
// of this package by testdata/devkeys_kat.py (HKDF from Python's hmac,
// primality from sympy, key encoding from pyca/cryptography).
func TestDevKeySeedKnownAnswers(t *testing.T) {
	s, _ := seededSigner(t, Config{Ed25519: true, DevKeySeed: testSeed()})
	want := map[pb.KeyType]string{
		pb.KeyType_KEY_TYPE_RSA:     "424bddfbfa466544ba9c54e6ae5c231b3d54b12c1c014fed9f3a11a395e10e8a",
		pb.KeyType_KEY_TYPE_ECC:     "f60e17bc9c203066a547744cc2e6a06a3d62af3a5bf25e2ca8fb2f15e0a964c9",
		pb.KeyType_KEY_TYPE_ED25519: "116cdc8e22374877bb9d6f71edf336d06f224f9a4c722c5c6a6231c6852a6028",
	}
	got := keyIDs(s)
	for typ, id := range want {
		if got[typ] != id {
			t.Errorf("%s key of the test seed: id %s, want %s", sigalg.TypeName(typ), got[typ], id)
		}
	}
	p384, err := deriveECDSA(testSeed(), elliptic.P384(), "P-384")
	if err != nil {
		t.Fatal(err)
	}
	point, err := p384.PublicKey.Bytes() // 04 || X || Y
	if err != nil {
		t.Fatal(err)
	}
	if got, want := hex.EncodeToString(point[1:9]), "ea3cd0f7899a0e3b"; got != want {
		t.Errorf("P-384 key of the test seed: X starts %s, want %s", got, want)
	}
}

// Every key type and size reads its own stream; each derived key has the
// shape its type asks for.
func TestDevKeyDerivation(t *testing.T) {
	seed := randomSeed(t)
	// Domain separation: distinct streams for distinct keys.
	heads := map[string]string{}
	for _, name := range []string{"Ed25519", "ECC-P-256", "ECC-P-384", "RSA-2048", "RSA-3072", "RSA-4096"} {
		r, err := newDevStream(seed, name)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 32)
		if _, err := io.ReadFull(r, b); err != nil {
			t.Fatal(err)
		}
		if prev, dup := heads[string(b)]; dup {
			t.Fatalf("streams %s and %s begin alike", prev, name)
		}
		heads[string(b)] = name
	}
	// A stream reads the same in any chunking, across HKDF blocks.
	r1, _ := newDevStream(seed, "RSA-2048")
	r2, _ := newDevStream(seed, "RSA-2048")
	whole := make([]byte, 3*devBlock+17)
	if _, err := io.ReadFull(r1, whole); err != nil {
		t.Fatal(err)
	}
	var pieces []byte
	for len(pieces) < len(whole) {
		b := make([]byte, min(997, len(whole)-len(pieces)))
		if _, err := io.ReadFull(r2, b); err != nil {
			t.Fatal(err)
		}
		pieces = append(pieces, b...)
	}
	if !bytes.Equal(whole, pieces) {
		t.Fatal("the stream depends on how it is read")
	}
	if bytes.Equal(whole[:devBlock], whole[devBlock:2*devBlock]) {
		t.Fatal("HKDF blocks repeat")
	}

	sizes := []int{2048, 3072}
	if testing.Short() {
		sizes = sizes[:1]
	}
	for _, bits := range sizes {
		k, err := deriveRSA(seed, bits)
		if err != nil {
			t.Fatal(err)
		}
		if k.N.BitLen() != bits || k.E != rsaExponent || len(k.Primes) != 2 {
			t.Fatalf("RSA-%d: N has %d bits, e = %d, %d primes", bits, k.N.BitLen(), k.E, len(k.Primes))
		}
		for _, p := range k.Primes {
			if p.BitLen() != bits/2 || p.Bit(bits/2-2) != 1 || !p.ProbablyPrime(20) {
				t.Fatalf("RSA-%d: a prime of %d bits, second bit %d", bits, p.BitLen(), p.Bit(bits/2-2))
			}
		}
		if err := k.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		curve elliptic.Curve
		name  string
	}{{elliptic.P256(), "P-256"}, {elliptic.P384(), "P-384"}} {
		k, err := deriveECDSA(seed, c.curve, c.name)
		if err != nil {
			t.Fatal(err)
		}
		digest := make([]byte, 32)
		sig, err := ecdsa.SignASN1(rand.Reader, k, digest)
		if err != nil || k.Curve != c.curve || !ecdsa.VerifyASN1(&k.PublicKey, digest, sig) {
			t.Fatalf("%s: derived key does not sign: %v", c.name, err)
		}
	}
	ed, err := deriveEd25519(seed)
	if err != nil || len(ed) != ed25519.PrivateKeySize {
		t.Fatalf("Ed25519: %v", err)
	}
}

// A seed of the wrong size is refused with its size, never its bytes.
func TestDevKeySeedValidate(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33, 64} {
		seed := make(DevKeySeed, n)
		for i := range seed {
			seed[i] = 0xa5
		}
		c := Config{DevKeySeed: seed}
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("dev key seed is %d bytes", n)) {
			t.Fatalf("%d-byte seed: %v", n, err)
		}
		if n > 0 && strings.Contains(strings.ToLower(err.Error()), "a5a5") {
			t.Fatalf("the error carries the seed: %v", err)
		}
		if _, err := New(Params{Config: c, Logger: zap.NewNop()}); err == nil {
			t.Fatalf("New with a %d-byte seed: no error", n)
		}
	}
	if err := (Config{DevKeySeed: testSeed()}).Validate(); err != nil {
		t.Fatal(err)
	}
}

// The seed does not print, whichever way a Config is printed, encoded or
// logged.
func TestDevKeySeedNeverPrinted(t *testing.T) {
	seed := randomSeed(t)
	c := Config{RSABits: 2048, Ed25519: true, DevKeySeed: seed}
	var outs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d", "%o", "%b"} {
		outs = append(outs, fmt.Sprintf(verb, c), fmt.Sprintf(verb, c.DevKeySeed), fmt.Sprintf(verb, &c))
	}
	outs = append(outs, fmt.Errorf("config %v: %w", c, errors.New("x")).Error())
	j, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	outs = append(outs, string(j))
	core, logs := observer.New(zap.DebugLevel)
	zap.New(core).Info("config", zap.Any("config", c), zap.Any("seed", c.DevKeySeed), zap.Reflect("reflected", c))
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	for _, e := range logs.All() {
		buf, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			t.Fatal(err)
		}
		outs = append(outs, buf.String())
	}
	forms := seedForms(seed)
	for _, out := range outs {
		for _, f := range forms {
			if strings.Contains(out, f) {
				t.Fatalf("%q carries the seed", out)
			}
		}
		if !strings.Contains(out, redacted) && !strings.HasPrefix(out, "&") {
			t.Errorf("%q: no %q in place of the seed", out, redacted)
		}
	}
}

// seedForms is the seed as text in every form a printer could give it.
func seedForms(seed []byte) []string {
	forms := []string{string(seed), hex.EncodeToString(seed), strings.ToUpper(hex.EncodeToString(seed)),
		base64.StdEncoding.EncodeToString(seed), base64.RawStdEncoding.EncodeToString(seed),
		base64.URLEncoding.EncodeToString(seed), base64.RawURLEncoding.EncodeToString(seed),
		fmt.Sprint([]byte(seed))}
	// Every 8-byte window in hex: a partial leak.
	for i := 0; i+8 <= len(seed); i += 4 {
		forms = append(forms, hex.EncodeToString(seed[i:i+8]))
	}
	return forms
}

// A seeded signer says loudly that its keys are derived, and its logs
// carry ids and specs only.
func TestDevKeySeedWarning(t *testing.T) {
	seed := randomSeed(t)
	s, logs := seededSigner(t, Config{Ed25519: true, DevKeySeed: seed})
	if len(logs) != len(s.Keys())+1 {
		t.Fatalf("%d log lines for %d keys", len(logs), len(s.Keys()))
	}
	w := logs[0]
	if w.Level != zapcore.WarnLevel || !strings.Contains(w.Message, "DEVELOPMENT ONLY: keys derived from --dev-key-seed: anyone who knows the seed has the keys") {
		t.Fatalf("first line %s %q: want the development warning", w.Level, w.Message)
	}
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	for _, e := range logs[1:] {
		for name := range e.ContextMap() {
			switch name {
			case "key_id", "key_spec", "generate_and_self_test", "origin":
			default:
				t.Errorf("unexpected log field %q", name)
			}
		}
		if e.ContextMap()["origin"] != "dev-key-seed" {
			t.Errorf("key line without origin dev-key-seed: %v", e.ContextMap())
		}
	}
	for _, e := range logs {
		buf, _ := enc.EncodeEntry(e.Entry, e.Context)
		for _, f := range seedForms(seed) {
			if strings.Contains(buf.String(), f) {
				t.Fatalf("a log line carries the seed: %s", buf.String())
			}
		}
	}
}

// How long derivation takes next to generation, for the record (timings
// are reported, never asserted: see BenchmarkDeriveRSA).
func TestDevKeyDerivationTime(t *testing.T) {
	n := 5
	if testing.Short() {
		n = 2
	}
	var derive, generate time.Duration
	seed := randomSeed(t)
	for i := range n {
		seed[0] = byte(i)
		start := time.Now()
		if _, err := deriveRSA(seed, 2048); err != nil {
			t.Fatal(err)
		}
		derive += time.Since(start)
		start = time.Now()
		if _, err := rsa.GenerateKey(rand.Reader, 2048); err != nil {
			t.Fatal(err)
		}
		generate += time.Since(start)
	}
	start := time.Now()
	if _, err := deriveECDSA(seed, elliptic.P256(), "P-256"); err != nil {
		t.Fatal(err)
	}
	ecc := time.Since(start)
	t.Logf("RSA-2048 mean of %d: derived in %v, generated (rsa.GenerateKey) in %v; ECC P-256 derived in %v",
		n, (derive / time.Duration(n)).Round(time.Millisecond), (generate / time.Duration(n)).Round(time.Millisecond), ecc)
}

func BenchmarkDeriveRSA(b *testing.B) {
	for _, bits := range []int{2048, 3072} {
		b.Run(fmt.Sprint(bits), func(b *testing.B) {
			seed := make(DevKeySeed, DevKeySeedSize)
			i := 0
			for b.Loop() {
				i++
				seed[0], seed[1] = byte(i), byte(i>>8)
				if _, err := deriveRSA(seed, bits); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDeriveECDSA(b *testing.B) {
	seed := make(DevKeySeed, DevKeySeedSize)
	for b.Loop() {
		if _, err := deriveECDSA(seed, elliptic.P256(), "P-256"); err != nil {
			b.Fatal(err)
		}
	}
}

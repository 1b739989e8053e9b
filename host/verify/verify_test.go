package verify_test

import (
	"bytes"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"math/big"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/veraison/go-cose"
	"go.uber.org/zap/zaptest"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/host/verify"
	"github.com/nitrosign/nitrosign/internal/keycommit"
	"github.com/nitrosign/nitrosign/internal/keycommit/keycommittest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Facts about the genuine document, from testdata/README.md.
const (
	genuineFile        = "genuine-brave-nitriding-20220804.cbor"
	genuineTimestampMS = 1659640280975 // 2022-08-04T19:11:20.975Z
	genuineModuleID    = "i-0809849710bf1b61b-enc01826a449a00b17a"
	genuinePCR0        = "da546f8dda37521945df4a6d3e397063588cd5f870aaa07a62e967b254d5f8176daa96ec83cdc5402b0b527a162472b5"
	genuineSigLen      = 96
)

var genuineTime = time.UnixMilli(genuineTimestampMS)

func genuine(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", genuineFile))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestAWSRoot(t *testing.T) {
	root, err := verify.AWSRoot()
	if err != nil {
		t.Fatalf("AWSRoot: %v", err)
	}
	if root.Subject.CommonName != "aws.nitro-enclaves" || !root.IsCA {
		t.Errorf("root subject %v, IsCA %v", root.Subject, root.IsCA)
	}
	if root.NotAfter.Year() != 2049 {
		t.Errorf("root NotAfter = %v, want 2049", root.NotAfter)
	}
}

func TestGenuineDocument(t *testing.T) {
	doc := genuine(t)
	pcr0, _ := hex.DecodeString(genuinePCR0)
	zero20 := make([]byte, 20)
	tests := []struct {
		name string
		opts verify.Options
	}{
		{"at its timestamp", verify.Options{Time: genuineTime}},
		{"with expected nonce and PCR0", verify.Options{Time: genuineTime, Nonce: zero20, PCRs: map[uint][]byte{0: pcr0}}},
		{"at the start of the chain's window", verify.Options{Time: time.Date(2022, 8, 4, 19, 11, 0, 0, time.UTC)}},
		{"at the end of the chain's window", verify.Options{Time: time.Date(2022, 8, 4, 22, 11, 3, 0, time.UTC)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := verify.Verify(doc, tt.opts)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if d.ModuleID != genuineModuleID {
				t.Errorf("ModuleID = %q", d.ModuleID)
			}
			if !d.Timestamp.Equal(genuineTime) {
				t.Errorf("Timestamp = %v, want %v", d.Timestamp, genuineTime)
			}
			if d.Digest != "SHA384" || len(d.PCRs) != 16 || !bytes.Equal(d.PCRs[0], pcr0) {
				t.Errorf("Digest %q, %d PCRs, PCR0 %x", d.Digest, len(d.PCRs), d.PCRs[0])
			}
			if len(d.PublicKey) != 32 || !bytes.Equal(d.UserData, zero20) || !bytes.Equal(d.Nonce, zero20) {
				t.Errorf("public_key %d bytes, user_data %x, nonce %x", len(d.PublicKey), d.UserData, d.Nonce)
			}
			root, _ := verify.AWSRoot()
			if len(d.CABundle) != 4 || !d.CABundle[0].Equal(root) {
				t.Errorf("cabundle: %d certificates, first is the AWS root: %v", len(d.CABundle), len(d.CABundle) > 0 && d.CABundle[0].Equal(root))
			}
			if !strings.HasPrefix(d.Certificate.Subject.CommonName, genuineModuleID) {
				t.Errorf("leaf CN = %q", d.Certificate.Subject.CommonName)
			}
			if !bytes.Equal(d.Raw, doc) {
				t.Error("Raw differs from the input")
			}
		})
	}
}

func TestGenuineDocumentRefused(t *testing.T) {
	doc := genuine(t)
	d, err := verify.Verify(doc, verify.Options{Time: genuineTime})
	if err != nil {
		t.Fatal(err)
	}
	leaf := d.Certificate
	otherPCR := bytes.Repeat([]byte{1}, 48)
	tests := []struct {
		name string
		opts verify.Options
		want error
	}{
		{"a day after the leaf's NotAfter", verify.Options{Time: leaf.NotAfter.Add(24 * time.Hour)}, verify.ErrExpired},
		{"before the leaf's NotBefore", verify.Options{Time: leaf.NotBefore.Add(-time.Second)}, verify.ErrExpired},
		{"now (default time)", verify.Options{}, verify.ErrExpired},
		{"against another root", verify.Options{Time: genuineTime, Root: newTestCA(t).root}, verify.ErrChain},
		{"other nonce", verify.Options{Time: genuineTime, Nonce: []byte("fresh")}, verify.ErrNonce},
		{"other PCR0", verify.Options{Time: genuineTime, PCRs: map[uint][]byte{0: otherPCR}}, verify.ErrPCRMismatch},
		{"missing PCR", verify.Options{Time: genuineTime, PCRs: map[uint][]byte{16: otherPCR}}, verify.ErrPCRMismatch},
		{"key commitment (its user_data is zeros)", verify.Options{Time: genuineTime, Keys: keycommittest.Keys(t)}, verify.ErrKeyCommitment},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := verify.Verify(doc, tt.opts)
			wantErr(t, d, err, tt.want)
		})
	}
}

// TestGenuineByteFlips flips every byte of the genuine document (envelope,
// payload and signature) and requires a refusal for each: ErrSignature when
// the result still parses, ErrMalformed when it does not. Every position is
// flipped in its lowest bit, every 7th and every signature byte also in its
// highest; -short samples every 13th position.
func TestGenuineByteFlips(t *testing.T) {
	doc := genuine(t)
	opts := verify.Options{Time: genuineTime}
	sigStart := len(doc) - genuineSigLen
	step := 1
	if testing.Short() {
		step = 13
	}
	const chunks = 4
	for c := 0; c < chunks; c++ {
		t.Run(fmt.Sprintf("chunk %d", c), func(t *testing.T) {
			t.Parallel()
			var sigErrs, malformed int
			for i := c * step; i < len(doc); i += chunks * step {
				masks := []byte{0x01}
				if i%7 == 0 || i >= sigStart {
					masks = append(masks, 0x80)
				}
				for _, mask := range masks {
					mod := bytes.Clone(doc)
					mod[i] ^= mask
					d, err := verify.Verify(mod, opts)
					if err == nil || d != nil {
						t.Fatalf("byte %d ^ %#x: Verify = %v, %v; want a refusal", i, mask, d, err)
					}
					switch s := sentinelOf(t, err); {
					case i >= sigStart && s != verify.ErrSignature:
						t.Fatalf("signature byte %d ^ %#x: error %v, want ErrSignature", i-sigStart, mask, err)
					case s == verify.ErrSignature:
						sigErrs++
					case s == verify.ErrMalformed:
						malformed++
					default:
						t.Fatalf("byte %d ^ %#x: error %v, want ErrSignature or ErrMalformed", i, mask, err)
					}
				}
			}
			t.Logf("refusals: %d ErrSignature, %d ErrMalformed", sigErrs, malformed)
		})
	}
}

// TestHighS checks that both (r, s) and (r, n-s) verify: about half of the
// genuine signatures are high-S, so a low-S rule would refuse them.
func TestHighS(t *testing.T) {
	n := elliptic.P384().Params().N
	flipS := func(doc []byte) []byte {
		mod := bytes.Clone(doc)
		sig := mod[len(mod)-genuineSigLen:]
		s := new(big.Int).SetBytes(sig[48:])
		new(big.Int).Sub(n, s).FillBytes(sig[48:])
		return mod
	}
	half := new(big.Int).Rsh(n, 1)
	isHigh := func(doc []byte) bool {
		return new(big.Int).SetBytes(doc[len(doc)-48:]).Cmp(half) > 0
	}

	doc := genuine(t)
	ca := newTestCA(t)
	forged := ca.doc(t, ca.fields())
	for _, tc := range []struct {
		name string
		doc  []byte
		opts verify.Options
	}{
		{"genuine", doc, verify.Options{Time: genuineTime}},
		{"forged", forged, ca.opts()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !bytes.Equal(tc.doc[len(tc.doc)-genuineSigLen-2:len(tc.doc)-genuineSigLen], []byte{0x58, 0x60}) {
				t.Fatal("document does not end with a 96-byte signature")
			}
			for _, d := range [][]byte{tc.doc, flipS(tc.doc)} {
				if _, err := verify.Verify(d, tc.opts); err != nil {
					t.Errorf("high-S %v: Verify: %v", isHigh(d), err)
				}
			}
		})
	}
}

func TestTaggedDocument(t *testing.T) {
	doc := append([]byte{0xd2}, genuine(t)...)
	if _, err := verify.Verify(doc, verify.Options{Time: genuineTime}); err != nil {
		t.Fatalf("tag 18: %v", err)
	}
	// Two tags, or tag 18 on something else, are refused.
	for _, d := range [][]byte{append([]byte{0xd2}, doc...), {0xd2, 0x80}} {
		got, err := verify.Verify(d, verify.Options{Time: genuineTime})
		wantErr(t, got, err, verify.ErrMalformed)
	}
}

// simulated returns a simulated NSM and its development root.
func simulated(t *testing.T) (*attest.Simulated, *x509.Certificate) {
	t.Helper()
	sim, err := attest.NewSimulated(zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	root, err := x509.ParseCertificate(sim.DevRootDER())
	if err != nil {
		t.Fatal(err)
	}
	return sim, root
}

func TestSimulatedDocuments(t *testing.T) {
	sim, devRoot := simulated(t)
	keys := keycommittest.Keys(t)
	callerUD := []byte("caller user data")
	commitment, err := keycommit.Compute(keys, callerUD)
	if err != nil {
		t.Fatal(err)
	}
	nonce := []byte("a fresh nonce")
	doc, err := sim.Attestation(nonce, commitment, nil)
	if err != nil {
		t.Fatal(err)
	}
	ok := verify.Options{Root: devRoot, Nonce: nonce, Keys: keys, UserData: callerUD, PCRs: attest.SimulatedPCRs()}

	t.Run("verifies against the dev root", func(t *testing.T) {
		d, err := verify.Verify(doc, ok)
		if err != nil {
			t.Fatalf("Verify: %v", err)
		}
		if d.ModuleID != sim.ModuleID() || !bytes.Equal(d.Nonce, nonce) || !bytes.Equal(d.UserData, commitment) || d.PublicKey != nil {
			t.Errorf("document: module %q nonce %q user_data %x public_key %x", d.ModuleID, d.Nonce, d.UserData, d.PublicKey)
		}
		if time.Since(d.Timestamp) > time.Minute || len(d.PCRs) != 16 {
			t.Errorf("timestamp %v, %d PCRs", d.Timestamp, len(d.PCRs))
		}
		if d.Payload[0] != 0xbf {
			t.Errorf("payload starts with %#x, want an indefinite-length map (0xbf)", d.Payload[0])
		}
		if !bytes.HasPrefix(doc, []byte{0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0}) {
			t.Errorf("envelope starts with %x, want 8444a1013822a0 like the NSM's", doc[:7])
		}
		if !d.CABundle[0].Equal(devRoot) {
			t.Error("cabundle[0] is not the dev root")
		}
	})

	otherKeys := keycommittest.Keys(t)
	attacker := keycommittest.Ed25519(t, 0x66)
	swapped := append(otherKeys[:len(otherKeys)-1:len(otherKeys)-1], attacker)
	lying := keycommittest.Keys(t)
	lying[0].PublicKey = attacker.PublicKey // keeps the honest id
	tests := []struct {
		name string
		mod  func(*verify.Options)
		want error
	}{
		{"against the AWS root", func(o *verify.Options) { o.Root = nil }, verify.ErrChain},
		{"wrong nonce", func(o *verify.Options) { o.Nonce = []byte("another nonce") }, verify.ErrNonce},
		{"nonce expected empty", func(o *verify.Options) { o.Nonce = []byte{} }, verify.ErrNonce},
		{"PCR1 differs", func(o *verify.Options) { o.PCRs = map[uint][]byte{1: make([]byte, 48)} }, verify.ErrPCRMismatch},
		{"key swapped in the list (MITM)", func(o *verify.Options) { o.Keys = swapped }, verify.ErrKeyCommitment},
		{"key replaced under its honest id", func(o *verify.Options) { o.Keys = lying }, verify.ErrKeyCommitment},
		{"key removed", func(o *verify.Options) { o.Keys = keys[1:] }, verify.ErrKeyCommitment},
		{"key added", func(o *verify.Options) { o.Keys = append(keycommittest.Keys(t), attacker) }, verify.ErrKeyCommitment},
		{"other caller user data", func(o *verify.Options) { o.UserData = []byte("other") }, verify.ErrKeyCommitment},
		{"no keys but key check required", func(o *verify.Options) { o.Keys, o.UserData, o.RequireKeyCommitment = nil, nil, true }, verify.ErrKeyCommitment},
		{"after the leaf expired", func(o *verify.Options) { o.Time = time.Now().Add(4 * time.Hour) }, verify.ErrExpired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.mod(&o)
			d, err := verify.Verify(doc, o)
			wantErr(t, d, err, tt.want)
		})
	}

	t.Run("key order does not matter", func(t *testing.T) {
		o := ok
		o.Keys = []*pb.KeyInfo{keys[3], keys[1], keys[0], keys[2]}
		if _, err := verify.Verify(doc, o); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("start-up document without nonce", func(t *testing.T) {
		c, _ := keycommit.Compute(keys, nil)
		doc, err := sim.Attestation(nil, c, nil)
		if err != nil {
			t.Fatal(err)
		}
		d, err := verify.Verify(doc, verify.Options{Root: devRoot, Keys: keys, RequireKeyCommitment: true, Nonce: []byte{}})
		if err != nil {
			t.Fatal(err)
		}
		if d.Nonce != nil {
			t.Errorf("nonce = %x, want nil", d.Nonce)
		}
	})
}

// TestForgedDocuments varies one aspect of an otherwise valid, validly
// signed document at a time.
func TestForgedDocuments(t *testing.T) {
	ca := newTestCA(t)
	base := ca.fields()
	big := bytes.Repeat([]byte{7}, verify.MaxOptionalField+1)
	max := bytes.Repeat([]byte{7}, verify.MaxOptionalField)
	zeroPCR0 := testPCRs()
	zeroPCR0[0] = make([]byte, 48)
	zeroPCR2 := testPCRs()
	zeroPCR2[2] = make([]byte, 48)
	shortPCR := testPCRs()
	shortPCR[3] = make([]byte, 47)
	sha256PCRs := map[uint64][]byte{0: bytes.Repeat([]byte{1}, 32)}
	farPCR := testPCRs()
	farPCR[32] = bytes.Repeat([]byte{1}, 48)
	noPCR0 := testPCRs()
	delete(noPCR0, 0)
	raw := func(hexs string) cbor.RawMessage {
		b, err := hex.DecodeString(hexs)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	expired := newTestCA(t, func(o *caOptions) { o.interNotAfter = forgeNow.Add(-time.Second) })
	p256 := newTestCA(t, func(o *caOptions) { o.leafCurve = elliptic.P256() })
	tests := []struct {
		name   string
		doc    func(*testing.T) []byte
		root   *x509.Certificate // nil: ca.root
		mod    func(*verify.Options)
		want   error // nil: must verify
		verify func(*testing.T, *verify.Document)
	}{
		{name: "valid, indefinite-length map", doc: func(t *testing.T) []byte { return ca.doc(t, base) }},
		{name: "valid, definite-length map", doc: func(t *testing.T) []byte { return ca.sign(t, encodePayload(t, base, false), signSpec{}) }},
		{name: "valid, fields in another order", doc: func(t *testing.T) []byte {
			return ca.doc(t, append([]field{base[8], base[4]}, append(base[:4:4], base[5:8]...)...))
		}},
		{name: "valid, unknown extra field", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "future", "x")) }},
		{name: "valid, optional fields absent", doc: func(t *testing.T) []byte {
			return ca.doc(t, without(without(without(base, "nonce"), "user_data"), "public_key"))
		}, verify: func(t *testing.T, d *verify.Document) {
			if d.Nonce != nil || d.UserData != nil || d.PublicKey != nil {
				t.Error("absent fields are not nil")
			}
		}},
		{name: "valid, empty byte strings", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "nonce", []byte{})) },
			verify: func(t *testing.T, d *verify.Document) {
				if d.Nonce != nil {
					t.Error("empty nonce is not nil")
				}
			}},
		{name: "valid, optional fields at the limit", doc: func(t *testing.T) []byte {
			return ca.doc(t, with(with(with(base, "nonce", max), "user_data", max), "public_key", max))
		}},
		{name: "valid, indefinite-length byte string", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "nonce", raw("5f426e6f436e6365ff"))) },
			verify: func(t *testing.T, d *verify.Document) {
				if string(d.Nonce) != "no"+"nce" {
					t.Errorf("nonce = %q", d.Nonce)
				}
			}},
		{name: "valid, SHA-256 sized PCR", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", sha256PCRs)) }},
		{name: "valid, cabundle without the root", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "cabundle", [][]byte{ca.inter.Raw})) }},
		{name: "valid, debug PCRs allowed", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", zeroPCR0)) },
			mod: func(o *verify.Options) { o.AllowDebug = true }},

		{name: "all-zero PCR0", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", zeroPCR0)) }, want: verify.ErrDebugPCRs},
		{name: "all-zero PCR2", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", zeroPCR2)) }, want: verify.ErrDebugPCRs},

		{name: "nonce too large", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "nonce", big)) }, want: verify.ErrFieldTooLarge},
		{name: "user_data too large", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "user_data", big)) }, want: verify.ErrFieldTooLarge},
		{name: "public_key too large", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "public_key", big)) }, want: verify.ErrFieldTooLarge},

		{name: "no module_id", doc: func(t *testing.T) []byte { return ca.doc(t, without(base, "module_id")) }, want: verify.ErrMalformed},
		{name: "empty module_id", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "module_id", "")) }, want: verify.ErrMalformed},
		{name: "module_id as bytes", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "module_id", []byte("i-0"))) }, want: verify.ErrMalformed},
		{name: "no digest", doc: func(t *testing.T) []byte { return ca.doc(t, without(base, "digest")) }, want: verify.ErrMalformed},
		{name: "digest SHA256", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "digest", "SHA256")) }, want: verify.ErrMalformed},
		{name: "no timestamp", doc: func(t *testing.T) []byte { return ca.doc(t, without(base, "timestamp")) }, want: verify.ErrMalformed},
		{name: "negative timestamp", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "timestamp", -5)) }, want: verify.ErrMalformed},
		{name: "timestamp as text", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "timestamp", "1659640280975")) }, want: verify.ErrMalformed},
		{name: "timestamp beyond int64", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "timestamp", uint64(1)<<63)) }, want: verify.ErrMalformed},
		{name: "no pcrs", doc: func(t *testing.T) []byte { return ca.doc(t, without(base, "pcrs")) }, want: verify.ErrMalformed},
		{name: "pcrs as array", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", [][]byte{make([]byte, 48)})) }, want: verify.ErrMalformed},
		{name: "empty pcrs", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", map[uint64][]byte{})) }, want: verify.ErrMalformed},
		{name: "47-byte PCR", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", shortPCR)) }, want: verify.ErrMalformed},
		{name: "PCR index 32", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", farPCR)) }, want: verify.ErrMalformed},
		{name: "no PCR0", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "pcrs", noPCR0)) }, want: verify.ErrMalformed},
		{name: "PCR as text", doc: func(t *testing.T) []byte {
			return ca.doc(t, with(base, "pcrs", map[uint64]string{0: strings.Repeat("a", 48)}))
		}, want: verify.ErrMalformed},
		{name: "PCR key negative", doc: func(t *testing.T) []byte {
			return ca.doc(t, with(base, "pcrs", map[int64][]byte{-1: make([]byte, 48)}))
		}, want: verify.ErrMalformed},
		{name: "no certificate", doc: func(t *testing.T) []byte { return ca.doc(t, without(base, "certificate")) }, want: verify.ErrMalformed},
		{name: "certificate garbage", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "certificate", []byte{0x30, 0x03, 1, 2, 3})) }, want: verify.ErrMalformed},
		{name: "certificate as text", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "certificate", "cert")) }, want: verify.ErrMalformed},
		{name: "no cabundle", doc: func(t *testing.T) []byte { return ca.doc(t, without(base, "cabundle")) }, want: verify.ErrMalformed},
		{name: "empty cabundle", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "cabundle", [][]byte{})) }, want: verify.ErrMalformed},
		{name: "cabundle entry as text", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "cabundle", []string{"x"})) }, want: verify.ErrMalformed},
		{name: "cabundle as map", doc: func(t *testing.T) []byte {
			return ca.doc(t, with(base, "cabundle", map[string][]byte{"0": ca.root.Raw}))
		}, want: verify.ErrMalformed},
		{name: "nonce as text", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "nonce", "nonce")) }, want: verify.ErrMalformed},
		{name: "nonce undefined", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "nonce", raw("f7"))) }, want: verify.ErrMalformed},
		{name: "user_data as array", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "user_data", []int{1})) }, want: verify.ErrMalformed},
		{name: "duplicate nonce", doc: func(t *testing.T) []byte {
			return ca.doc(t, append(slices.Clone(base), field{"nonce", []byte("other")}))
		}, want: verify.ErrMalformed},
		{name: "payload not a map", doc: func(t *testing.T) []byte { return ca.sign(t, []byte{0x80}, signSpec{}) }, want: verify.ErrMalformed},
		{name: "payload with trailing byte", doc: func(t *testing.T) []byte {
			return ca.sign(t, append(encodePayload(t, base, true), 0), signSpec{})
		}, want: verify.ErrMalformed},
		{name: "payload unterminated", doc: func(t *testing.T) []byte {
			p := encodePayload(t, base, true)
			return ca.sign(t, p[:len(p)-1], signSpec{})
		}, want: verify.ErrMalformed},
		{name: "ES256 header", doc: func(t *testing.T) []byte {
			return ca.sign(t, encodePayload(t, base, true), signSpec{alg: cose.AlgorithmES256})
		}, want: verify.ErrMalformed},
		{name: "extra protected header", doc: func(t *testing.T) []byte {
			return ca.sign(t, encodePayload(t, base, true), signSpec{protected: cose.ProtectedHeader{
				cose.HeaderLabelAlgorithm: cose.AlgorithmES384, cose.HeaderLabelKeyID: []byte("k"),
			}})
		}, want: verify.ErrMalformed},
		{name: "non-empty unprotected header", doc: func(t *testing.T) []byte {
			return ca.sign(t, encodePayload(t, base, true), signSpec{unprotected: cose.UnprotectedHeader{cose.HeaderLabelKeyID: []byte("k")}})
		}, want: verify.ErrMalformed},
		{name: "signed by a key other than the leaf's", doc: func(t *testing.T) []byte {
			other := newTestCA(t)
			return other.doc(t, base) // base names ca's leaf
		}, want: verify.ErrSignature},
		{name: "leaf not issued under the root", doc: func(t *testing.T) []byte {
			other := newTestCA(t)
			return other.doc(t, with(other.fields(), "cabundle", [][]byte{ca.root.Raw, ca.inter.Raw}))
		}, want: verify.ErrChain},
		{name: "intermediate missing", doc: func(t *testing.T) []byte { return ca.doc(t, with(base, "cabundle", [][]byte{ca.root.Raw})) }, want: verify.ErrChain},
		{name: "leaf expired", doc: func(t *testing.T) []byte { return ca.doc(t, base) },
			mod: func(o *verify.Options) { o.Time = ca.leaf.NotAfter.Add(time.Second) }, want: verify.ErrExpired},
		{name: "before the chain's validity", doc: func(t *testing.T) []byte { return ca.doc(t, base) },
			mod: func(o *verify.Options) { o.Time = ca.root.NotBefore.Add(-time.Second) }, want: verify.ErrExpired},
		{name: "intermediate expired", doc: func(t *testing.T) []byte { return expired.doc(t, expired.fields()) },
			root: expired.root, want: verify.ErrExpired},
		{name: "P-256 leaf", doc: func(t *testing.T) []byte { return p256.doc(t, p256.fields()) },
			root: p256.root, want: verify.ErrSignature},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := tt.doc(t)
			opts := ca.opts()
			if tt.root != nil {
				opts.Root = tt.root
			}
			if tt.mod != nil {
				tt.mod(&opts)
			}
			d, err := verify.Verify(doc, opts)
			if tt.want != nil {
				wantErr(t, d, err, tt.want)
				return
			}
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if tt.verify != nil {
				tt.verify(t, d)
			}
		})
	}
}

func TestGarbage(t *testing.T) {
	doc := genuine(t)
	opts := verify.Options{Time: genuineTime}
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int, prefix ...byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		copy(b, prefix)
		return b
	}
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"nil", nil, verify.ErrMalformed},
		{"empty", []byte{}, verify.ErrMalformed},
		{"one byte", []byte{0x84}, verify.ErrMalformed},
		{"empty array", []byte{0x80}, verify.ErrMalformed},
		{"four nulls", []byte{0x84, 0xf6, 0xf6, 0xf6, 0xf6}, verify.ErrMalformed},
		{"null payload", []byte{0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0xf6, 0x41, 0x00}, verify.ErrMalformed},
		{"empty payload", []byte{0x84, 0x44, 0xa1, 0x01, 0x38, 0x22, 0xa0, 0x40, 0x41, 0x00}, verify.ErrMalformed},
		{"indefinite array envelope", append([]byte{0x9f}, append(doc[1:], 0xff)...), verify.ErrMalformed},
		{"trailing byte", append(bytes.Clone(doc), 0x00), verify.ErrMalformed},
		{"oversized", make([]byte, verify.MaxDocumentSize+1), verify.ErrFieldTooLarge},
		{"oversized valid prefix", append(bytes.Clone(doc), make([]byte, verify.MaxDocumentSize)...), verify.ErrFieldTooLarge},
	}
	for i := 0; i < 200; i++ {
		tests = append(tests, struct {
			name string
			in   []byte
			want error
		}{"random", random(1 + rng.IntN(6000)), verify.ErrMalformed})
		tests = append(tests, struct {
			name string
			in   []byte
			want error
		}{"random after the genuine header", random(1+rng.IntN(6000), doc[:10]...), verify.ErrMalformed})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := verify.Verify(tt.in, opts)
			wantErr(t, d, err, tt.want)
		})
	}

	t.Run("every truncation", func(t *testing.T) {
		for n := 0; n < len(doc); n++ {
			d, err := verify.Verify(doc[:n], opts)
			if err == nil || d != nil {
				t.Fatalf("truncated to %d bytes: Verify = %v, %v", n, d, err)
			}
			sentinelOf(t, err)
		}
	})
}

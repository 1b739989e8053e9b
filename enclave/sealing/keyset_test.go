package sealing

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/fakes/kmsfake"
	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func testKeyset(t *testing.T) *Keyset {
	t.Helper()
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, edk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	created := time.Date(2026, 12, 3, 3, 0, 0, 0, time.UTC)
	ks := &Keyset{Created: created}
	for _, k := range []struct {
		typ   pb.KeyType
		priv  crypto.Signer
		state State
	}{{pb.KeyType_KEY_TYPE_RSA, rk, Enabled}, {pb.KeyType_KEY_TYPE_ECC, ek, Disabled}, {pb.KeyType_KEY_TYPE_ED25519, edk, Enabled}} {
		id, err := keyID(k.priv.Public())
		if err != nil {
			t.Fatal(err)
		}
		ks.Keys = append(ks.Keys, Key{ID: id, Type: k.typ, Version: 1, State: k.state, Created: created, Private: k.priv})
	}
	return ks
}

// A sealed keyset opens to the same keys, which sign as before; its
// header is readable without KMS and holds no key.
func TestSealUnseal(t *testing.T) {
	f := newFixture(t, "")
	ks := testKeyset(t)
	sealed, err := Seal(ctx(t), ks, f.keys, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	h, err := ReadHeader(sealed)
	if err != nil {
		t.Fatal(err)
	}
	if h.KMSKeyARN != kmsfake.KeyARN || len(h.KeyIDs) != 3 || h.KeyIDs[0] != ks.Keys[0].ID || !h.Created.Equal(ks.Created) {
		t.Fatalf("header %+v", h)
	}
	got, err := Unseal(ctx(t), sealed, f.keys)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Keys) != 3 || !got.Created.Equal(ks.Created) {
		t.Fatalf("unsealed %+v", got)
	}
	digest := sha256.Sum256([]byte("m"))
	for i, k := range got.Keys {
		want := ks.Keys[i]
		if k.ID != want.ID || k.Type != want.Type || k.State != want.State || k.Version != want.Version || !k.Created.Equal(want.Created) {
			t.Fatalf("key %d: %+v, want %+v", i, k, want)
		}
		opts := crypto.Hash(0)
		msg := []byte("m")
		if k.Type != pb.KeyType_KEY_TYPE_ED25519 {
			opts, msg = crypto.SHA256, digest[:]
		}
		sig, err := k.Private.Sign(rand.Reader, msg, opts)
		if err != nil {
			t.Fatal(err)
		}
		switch pub := want.Private.Public().(type) {
		case *rsa.PublicKey:
			err = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig)
		case *ecdsa.PublicKey:
			if !ecdsa.VerifyASN1(pub, digest[:], sig) {
				err = errors.New("ECDSA signature does not verify")
			}
		case ed25519.PublicKey:
			if !ed25519.Verify(pub, msg, sig) {
				err = errors.New("Ed25519 signature does not verify")
			}
		}
		if err != nil {
			t.Fatalf("key %d: a signature of the unsealed key, checked with the original public key: %v", i, err)
		}
	}
	for _, k := range ks.Keys {
		if bytes.Contains(sealed, []byte(k.ID)) && bytes.Contains(sealed, mustPKCS8(t, k.Private)) {
			t.Fatal("a private key is in the sealed keyset in clear")
		}
	}
}

func mustPKCS8(t *testing.T, k crypto.Signer) []byte {
	t.Helper()
	b, err := x509MarshalPKCS8(k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Nothing changed, truncated, swapped or sealed elsewhere opens: each gets
// its reason, and no key.
func TestUnsealRefuses(t *testing.T) {
	f := newFixture(t, "")
	ks := testKeyset(t)
	sealed, err := Seal(ctx(t), ks, f.keys, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	other, err := Seal(ctx(t), testKeyset(t), f.keys, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	hdrLen := int(binary.BigEndian.Uint32(sealed[5:9]))
	withHeader := func(old, new string) []byte {
		hdr := sealed[9 : 9+hdrLen]
		nh := bytes.Replace(hdr, []byte(old), []byte(new), 1)
		if bytes.Equal(nh, hdr) {
			t.Fatalf("header has no %q", old)
		}
		var b bytes.Buffer
		b.Write(sealed[:5])
		_ = binary.Write(&b, binary.BigEndian, uint32(len(nh)))
		b.Write(nh)
		b.Write(sealed[9+hdrLen:])
		return b.Bytes()
	}
	// The data key blob of another sealed keyset (both under this KMS key).
	swapBlob := func() []byte {
		a, errA := keysetfmt.Parse(sealed)
		b, errB := keysetfmt.Parse(other)
		if errA != nil || errB != nil || len(a.Blob) != len(b.Blob) {
			t.Fatalf("blobs: %v, %v (the fake's blobs are all one size)", errA, errB)
		}
		offA := len(a.AAD)
		out := bytes.Clone(sealed)
		copy(out[offA-len(a.Blob):offA], b.Blob)
		return out
	}
	flipped := bytes.Clone(sealed)
	flipped[len(flipped)-1] ^= 1
	otherKMS, err := NewDataKeys(f.keys.kms, f.nsm, "arn:aws:kms:eu-west-1:111122223333:key/another")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		in   []byte
		keys *DataKeys
		want error
		says string
	}{
		{"truncated", sealed[:len(sealed)/2], f.keys, ErrCorrupt, ""},
		{"empty", nil, f.keys, ErrCorrupt, "magic"},
		{"a byte of the body flipped", flipped, f.keys, ErrCorrupt, "does not open"},
		{"header: key ids swapped", withHeader(ks.Keys[0].ID, ks.Keys[1].ID), f.keys, ErrCorrupt, "does not open"},
		{"header: creation time changed", withHeader(`"created":"2026`, `"created":"2025`), f.keys, ErrCorrupt, "does not open"},
		{"data key blob of another file", swapBlob(), f.keys, ErrCorrupt, "does not open"},
		{"another KMS key configured", sealed, otherKMS, ErrWrongKMSKey, "sealed under"},
		{"format 2", append([]byte("NSKS\x02"), sealed[5:]...), f.keys, ErrCorrupt, "format 2"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Unseal(ctx(t), tt.in, tt.keys)
			if !errors.Is(err, tt.want) || got != nil || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("Unseal = %v, %v; want %v naming %q", got, err, tt.want, tt.says)
			}
			t.Log(err)
		})
	}
	// KMS refuses (the enclave's PCRs are not the policy's): KMS's reason.
	f.fake.SetPCRs(map[uint][]byte{0: bytes.Repeat([]byte{9}, 48)})
	if _, err := Unseal(ctx(t), sealed, f.keys); !errors.Is(err, ErrKMS) || !strings.Contains(err.Error(), "AccessDeniedException") {
		t.Fatalf("Unseal refused by KMS = %v", err)
	}
}

func TestSealRefusesBadKeysets(t *testing.T) {
	f := newFixture(t, "")
	ks := testKeyset(t)
	ks.Keys[1].ID = ks.Keys[0].ID
	if _, err := Seal(ctx(t), ks, f.keys, time.Now()); err == nil || !strings.Contains(err.Error(), "its id is not its public key's") {
		t.Fatalf("Seal with a wrong id = %v", err)
	}
	ks = testKeyset(t)
	ks.Keys[0].Type = pb.KeyType_KEY_TYPE_ECC // an RSA key
	if _, err := Seal(ctx(t), ks, f.keys, time.Now()); err == nil || !strings.Contains(err.Error(), "does not match the key") {
		t.Fatalf("Seal with a wrong type = %v", err)
	}
	if _, err := Seal(ctx(t), &Keyset{}, f.keys, time.Now()); err == nil {
		t.Fatal("Seal of an empty keyset succeeded")
	}
	if f.fake.Called() != "[]" {
		t.Fatalf("KMS was called for a keyset that cannot be sealed: %s", f.fake.Called())
	}
}

func FuzzReadHeader(f *testing.F) {
	f.Add([]byte("NSKS\x01\x00\x00\x00\x02{}"))
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = ReadHeader(b) })
}

var x509MarshalPKCS8 = func(k crypto.Signer) ([]byte, error) { return x509.MarshalPKCS8PrivateKey(k) }

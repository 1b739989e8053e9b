package keycommit_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/nitrosign/nitrosign/internal/keycommit"
	"github.com/nitrosign/nitrosign/internal/keycommit/keycommittest"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
	"google.golang.org/protobuf/proto"
)

// preimage builds the hashed bytes by hand, straight from the package
// documentation, so a change of the format breaks this test.
func preimage(keys []*pb.KeyInfo, userData []byte) []byte {
	var b bytes.Buffer
	u32 := func(n int) { b.Write(binary.BigEndian.AppendUint32(nil, uint32(n))) }
	b.WriteString("nitrosign/key-commitment/v1")
	u32(len(keys))
	for _, k := range keys {
		u32(len(k.KeyId))
		b.WriteString(k.KeyId)
		u32(len(k.PublicKey))
		b.Write(k.PublicKey)
	}
	u32(len(userData))
	b.Write(userData)
	return b.Bytes()
}

func TestComputeFormat(t *testing.T) {
	keys := keycommittest.Keys(t)
	sorted := slices.Clone(keys)
	slices.SortFunc(sorted, func(a, b *pb.KeyInfo) int { return strings.Compare(a.KeyId, b.KeyId) })
	for _, ud := range [][]byte{nil, {}, []byte("hello"), bytes.Repeat([]byte{0xff}, 1024)} {
		got, err := keycommit.Compute(keys, ud)
		if err != nil {
			t.Fatalf("Compute: %v", err)
		}
		want := sha256.Sum256(preimage(sorted, ud))
		if !bytes.Equal(got, want[:]) {
			t.Errorf("user data %d bytes: Compute = %x, want %x", len(ud), got, want)
		}
		if len(got) != keycommit.Size {
			t.Errorf("len = %d, want %d", len(got), keycommit.Size)
		}
	}
}

// TestKnownAnswer pins the commitment of fixed Ed25519 keys, so that the
// format cannot drift unnoticed between the enclave and older clients.
func TestKnownAnswer(t *testing.T) {
	keys := []*pb.KeyInfo{keycommittest.Ed25519(t, 1), keycommittest.Ed25519(t, 2)}
	got, err := keycommit.Compute(keys, []byte("nitrosign"))
	if err != nil {
		t.Fatal(err)
	}
	// Cross-checked with an independent Python (hashlib + cryptography) implementation.
	const want = "f34087ccefedf302436345fae4a1ae307584c6e9f127e18c087c6585446a0449"
	if hex.EncodeToString(got) != want {
		t.Errorf("Compute = %x, want %s", got, want)
	}
}

func TestOrderIndependence(t *testing.T) {
	keys := keycommittest.Keys(t)
	want, err := keycommit.Compute(keys, []byte("ud"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	permute(keys, 0, func(p []*pb.KeyInfo) {
		n++
		before := slices.Clone(p)
		got, err := keycommit.Compute(p, []byte("ud"))
		if err != nil {
			t.Fatalf("Compute: %v", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("permutation %d: commitment differs", n)
		}
		if !slices.Equal(before, p) {
			t.Errorf("permutation %d: Compute reordered its input", n)
		}
	})
	if n != 24 {
		t.Fatalf("visited %d permutations, want 24", n)
	}
}

func permute(s []*pb.KeyInfo, i int, f func([]*pb.KeyInfo)) {
	if i == len(s) {
		f(s)
		return
	}
	for j := i; j < len(s); j++ {
		s[i], s[j] = s[j], s[i]
		permute(s, i+1, f)
		s[i], s[j] = s[j], s[i]
	}
}

// TestEveryByteMatters flips every bit position's byte of every public key
// (re-deriving the id, as an honest list would) and of the user data, and
// checks that each change gives a new commitment.
func TestEveryByteMatters(t *testing.T) {
	keys := keycommittest.Keys(t)[1:] // the ECC and Ed25519 keys keep this quick
	userData := []byte("caller user data")
	base, err := keycommit.Compute(keys, userData)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{string(base): true}
	check := func(name string, keys []*pb.KeyInfo, ud []byte) {
		t.Helper()
		got, err := keycommit.Compute(keys, ud)
		if err != nil {
			t.Fatalf("%s: Compute: %v", name, err)
		}
		if seen[string(got)] {
			t.Fatalf("%s: commitment repeats an earlier one", name)
		}
		seen[string(got)] = true
	}
	for ki := range keys {
		for i := range keys[ki].PublicKey {
			mod := cloneKeys(keys)
			mod[ki].PublicKey[i] ^= 0x01
			mod[ki].KeyId = keycommit.KeyID(mod[ki].PublicKey)
			check("key byte", mod, userData)
		}
	}
	for i := range userData {
		ud := bytes.Clone(userData)
		ud[i] ^= 0x80
		check("user data byte", keys, ud)
	}
	check("user data appended", keys, append(bytes.Clone(userData), 0))
	check("user data truncated", keys, userData[:len(userData)-1])
	check("key removed", keys[1:], userData)
	check("key added", append(cloneKeys(keys), keycommittest.Ed25519(t, 9)), userData)
}

func TestNilAndEmptyUserDataAgree(t *testing.T) {
	keys := keycommittest.Keys(t)
	a, err := keycommit.Compute(keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := keycommit.Compute(keys, []byte{})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Error("nil and empty user data give different commitments")
	}
}

func TestRejects(t *testing.T) {
	good := keycommittest.Keys(t)
	tests := []struct {
		name string
		keys func() []*pb.KeyInfo
		want error
	}{
		{"empty list", func() []*pb.KeyInfo { return nil }, keycommit.ErrNoKeys},
		{"nil key", func() []*pb.KeyInfo { return append(cloneKeys(good), nil) }, keycommit.ErrInvalidKey},
		{"no public key", func() []*pb.KeyInfo {
			k := cloneKeys(good)
			k[0].PublicKey = nil
			return k
		}, keycommit.ErrInvalidKey},
		{"empty key id", func() []*pb.KeyInfo {
			k := cloneKeys(good)
			k[1].KeyId = ""
			return k
		}, keycommit.ErrInvalidKey},
		{"upper-case key id", func() []*pb.KeyInfo {
			k := cloneKeys(good)
			k[1].KeyId = strings.ToUpper(k[1].KeyId)
			return k
		}, keycommit.ErrInvalidKey},
		{"public key swapped under an old id (MITM)", func() []*pb.KeyInfo {
			k := cloneKeys(good)
			k[2].PublicKey = keycommittest.Ed25519(t, 7).PublicKey
			return k
		}, keycommit.ErrInvalidKey},
		{"ids exchanged between two keys", func() []*pb.KeyInfo {
			k := cloneKeys(good)
			k[1].KeyId, k[2].KeyId = k[2].KeyId, k[1].KeyId
			return k
		}, keycommit.ErrInvalidKey},
		{"duplicate key", func() []*pb.KeyInfo { return append(cloneKeys(good), cloneKeys(good)[3]) }, keycommit.ErrInvalidKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := keycommit.Compute(tt.keys(), []byte("x"))
			if !errors.Is(err, tt.want) {
				t.Fatalf("Compute error = %v, want %v", err, tt.want)
			}
			if got != nil {
				t.Errorf("Compute returned %x with an error", got)
			}
			if ok, err := keycommit.Equal(make([]byte, 32), tt.keys(), nil); ok || !errors.Is(err, tt.want) {
				t.Errorf("Equal = %v, %v; want false, %v", ok, err, tt.want)
			}
		})
	}
}

func TestEqual(t *testing.T) {
	keys := keycommittest.Keys(t)
	c, err := keycommit.Compute(keys, []byte("u"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		commitment []byte
		userData   []byte
		want       bool
	}{
		{"match", c, []byte("u"), true},
		{"other user data", c, []byte("v"), false},
		{"truncated", c[:31], []byte("u"), false},
		{"empty", nil, []byte("u"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := keycommit.Equal(tt.commitment, keys, tt.userData)
			if err != nil || got != tt.want {
				t.Errorf("Equal = %v, %v; want %v, nil", got, err, tt.want)
			}
		})
	}
}

func TestSortKeys(t *testing.T) {
	keys := keycommittest.Keys(t)
	sorted, err := keycommit.SortKeys(keys)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.IsSortedFunc(sorted, func(a, b *pb.KeyInfo) int { return strings.Compare(a.KeyId, b.KeyId) }) {
		t.Error("SortKeys result is not sorted by key_id")
	}
	if len(sorted) != len(keys) {
		t.Errorf("len = %d, want %d", len(sorted), len(keys))
	}
}

func TestKeyID(t *testing.T) {
	// SHA-256 of the empty string, a well-known value.
	if got, want := keycommit.KeyID(nil), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"; got != want {
		t.Errorf("KeyID(nil) = %s, want %s", got, want)
	}
}

func cloneKeys(keys []*pb.KeyInfo) []*pb.KeyInfo {
	out := make([]*pb.KeyInfo, len(keys))
	for i, k := range keys {
		out[i] = proto.Clone(k).(*pb.KeyInfo)
	}
	return out
}

// Version 2 is built by hand from the package documentation too; it never
// equals version 1, and Equal/EqualWithPolicy tell them apart.
func TestComputeWithPolicyFormat(t *testing.T) {
	keys := keycommittest.Keys(t)
	sorted := slices.Clone(keys)
	slices.SortFunc(sorted, func(a, b *pb.KeyInfo) int { return strings.Compare(a.KeyId, b.KeyId) })
	policy := sha256.Sum256([]byte(`{"version":1,"callers":[]}`))
	ud := []byte("hello")
	got, err := keycommit.ComputeWithPolicy(keys, policy[:], ud)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	u32 := func(n int) { b.Write(binary.BigEndian.AppendUint32(nil, uint32(n))) }
	b.WriteString("nitrosign/key-commitment/v2")
	u32(len(sorted))
	for _, k := range sorted {
		u32(len(k.KeyId))
		b.WriteString(k.KeyId)
		u32(len(k.PublicKey))
		b.Write(k.PublicKey)
	}
	u32(32)
	b.Write(policy[:])
	u32(len(ud))
	b.Write(ud)
	want := sha256.Sum256(b.Bytes())
	if !bytes.Equal(got, want[:]) {
		t.Fatalf("ComputeWithPolicy = %x, want %x", got, want)
	}
	v1, _ := keycommit.Compute(keys, ud)
	if bytes.Equal(v1, got) {
		t.Fatal("version 2 equals version 1")
	}
	if ok, err := keycommit.EqualWithPolicy(got, keys, policy[:], ud); err != nil || !ok {
		t.Fatalf("EqualWithPolicy = %v, %v", ok, err)
	}
	if ok, _ := keycommit.Equal(got, keys, ud); ok {
		t.Fatal("a version 2 commitment verified as version 1")
	}
	other := sha256.Sum256([]byte("another policy"))
	if ok, _ := keycommit.EqualWithPolicy(got, keys, other[:], ud); ok {
		t.Fatal("a commitment verified with another policy")
	}
	if _, err := keycommit.ComputeWithPolicy(keys, policy[:31], ud); err == nil {
		t.Fatal("a 31-byte policy digest was accepted")
	}
}

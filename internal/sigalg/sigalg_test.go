package sigalg

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestParseAndName(t *testing.T) {
	for v := range pb.SigningAlgorithm_name {
		alg := pb.SigningAlgorithm(v)
		if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED {
			continue
		}
		for _, s := range []string{Name(alg), "signing_algorithm_" + Name(alg), " " + Name(alg) + " "} {
			got, err := Parse(s)
			if err != nil || got != alg {
				t.Errorf("Parse(%q) = %v, %v", s, got, err)
			}
		}
		if _, ok := Hash(alg); !ok {
			t.Errorf("%s has no hash", Name(alg))
		}
	}
	for _, s := range []string{"", "UNSPECIFIED", "MD5", "ECDSA_SHA_1"} {
		if _, err := Parse(s); !errors.Is(err, ErrInvalid) {
			t.Errorf("Parse(%q): %v, want ErrInvalid", s, err)
		}
	}
	if Name(99) != "SigningAlgorithm(99)" || SpecName(99) != "KeySpec(99)" || TypeName(99) != "KeyType(99)" {
		t.Error("unknown enum values must render as numbers")
	}
}

func TestEveryKeySpecHasAlgorithms(t *testing.T) {
	for v := range pb.KeySpec_name {
		spec := pb.KeySpec(v)
		algs := ForKey(spec)
		if spec == pb.KeySpec_KEY_SPEC_UNSPECIFIED {
			if algs != nil {
				t.Error("UNSPECIFIED has algorithms")
			}
			continue
		}
		if len(algs) == 0 {
			t.Errorf("%s has no algorithms", SpecName(spec))
		}
		for _, a := range algs {
			if !Fits(spec, a) {
				t.Errorf("%s does not fit its own %s", SpecName(spec), Name(a))
			}
		}
	}
}

func TestDigest(t *testing.T) {
	alg := pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256
	want := sha256.Sum256([]byte("abc"))
	got, err := Digest(alg, pb.MessageType_MESSAGE_TYPE_RAW, []byte("abc"))
	if err != nil || string(got) != string(want[:]) {
		t.Fatalf("RAW digest: %x, %v", got, err)
	}
	// UNSPECIFIED is RAW.
	if got, _ := Digest(alg, pb.MessageType_MESSAGE_TYPE_UNSPECIFIED, []byte("abc")); string(got) != string(want[:]) {
		t.Fatal("UNSPECIFIED message type is not RAW")
	}
	// DIGEST passes through; a digest sent as RAW is hashed again.
	got, _ = Digest(alg, pb.MessageType_MESSAGE_TYPE_DIGEST, want[:])
	if string(got) != string(want[:]) {
		t.Fatal("DIGEST changed")
	}
	twice, _ := Digest(alg, pb.MessageType_MESSAGE_TYPE_RAW, want[:])
	if string(twice) == string(want[:]) {
		t.Fatal("a digest sent as RAW must be hashed again")
	}
	if _, err := Digest(alg, pb.MessageType_MESSAGE_TYPE_RAW, make([]byte, MaxRawMessage)); err != nil {
		t.Fatalf("%d bytes RAW: %v", MaxRawMessage, err)
	}
	for _, tc := range []struct {
		alg pb.SigningAlgorithm
		mt  pb.MessageType
		msg []byte
	}{
		{alg, pb.MessageType_MESSAGE_TYPE_RAW, nil},
		{alg, pb.MessageType_MESSAGE_TYPE_RAW, make([]byte, MaxRawMessage+1)},
		{alg, pb.MessageType_MESSAGE_TYPE_DIGEST, make([]byte, 31)},
		{alg, 7, []byte("x")},
		{0, pb.MessageType_MESSAGE_TYPE_RAW, []byte("x")},
		{pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512, pb.MessageType_MESSAGE_TYPE_DIGEST, make([]byte, 64)},
	} {
		if _, err := Digest(tc.alg, tc.mt, tc.msg); !errors.Is(err, ErrInvalid) {
			t.Errorf("Digest(%s, %s, %d bytes): %v, want ErrInvalid", Name(tc.alg), tc.mt, len(tc.msg), err)
		}
	}
}

func TestVerifyRejectsMismatches(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	alg := pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256
	d, _ := Digest(alg, pb.MessageType_MESSAGE_TYPE_RAW, []byte("m"))
	sig, err := Sign(rand.Reader, k, alg, d)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(k.Public(), alg, pb.MessageType_MESSAGE_TYPE_RAW, []byte("m"), sig); err != nil {
		t.Fatal(err)
	}
	if err := Verify(k.Public(), alg, pb.MessageType_MESSAGE_TYPE_RAW, []byte("n"), sig); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("other message: %v", err)
	}
	if err := Verify(k.Public(), pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256, pb.MessageType_MESSAGE_TYPE_RAW, []byte("m"), sig); !errors.Is(err, ErrInvalid) {
		t.Fatalf("RSA algorithm on an EC key: %v", err)
	}
	if _, err := Sign(rand.Reader, k, pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256, d); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Sign with a key of the wrong type: %v", err)
	}
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if _, err := SpecOf(p224.Public()); !errors.Is(err, ErrInvalid) {
		t.Fatalf("P-224: %v", err)
	}
}

func FuzzDigest(f *testing.F) {
	f.Add(int32(7), int32(1), []byte("m"))
	f.Add(int32(1), int32(2), make([]byte, 32))
	f.Fuzz(func(t *testing.T, alg, mt int32, msg []byte) {
		d, err := Digest(pb.SigningAlgorithm(alg), pb.MessageType(mt), msg)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if len(d) == 0 {
			t.Fatal("empty digest accepted")
		}
	})
}

// Package keycommittest builds signing-key descriptions for tests of the
// packages that commit to keys (enclave/attest, host/verify) without
// depending on the enclave's signer.
package keycommittest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"sync"
	"testing"

	"github.com/nitrosign/nitrosign/internal/keycommit"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// Info describes pub as the signer would: key_id is the hex SHA-256 of the
// DER SPKI.
func Info(tb testing.TB, pub crypto.PublicKey) *pb.KeyInfo {
	tb.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		tb.Fatalf("MarshalPKIXPublicKey: %v", err)
	}
	k := &pb.KeyInfo{KeyId: keycommit.KeyID(der), PublicKey: der}
	switch p := pub.(type) {
	case *rsa.PublicKey:
		k.KeyType = pb.KeyType_KEY_TYPE_RSA
		switch p.N.BitLen() {
		case 2048:
			k.KeySpec = pb.KeySpec_KEY_SPEC_RSA_2048
		case 3072:
			k.KeySpec = pb.KeySpec_KEY_SPEC_RSA_3072
		case 4096:
			k.KeySpec = pb.KeySpec_KEY_SPEC_RSA_4096
		}
	case *ecdsa.PublicKey:
		k.KeyType = pb.KeyType_KEY_TYPE_ECC
		switch p.Curve {
		case elliptic.P256():
			k.KeySpec = pb.KeySpec_KEY_SPEC_ECC_NIST_P256
		case elliptic.P384():
			k.KeySpec = pb.KeySpec_KEY_SPEC_ECC_NIST_P384
		}
	case ed25519.PublicKey:
		k.KeyType = pb.KeyType_KEY_TYPE_ED25519
		k.KeySpec = pb.KeySpec_KEY_SPEC_ECC_NIST_EDWARDS25519
	}
	return k
}

var (
	keysOnce sync.Once
	keysErr  error
	keys     []crypto.PublicKey
)

// Keys returns the descriptions of one key of each family the enclave uses
// (RSA-2048, ECDSA P-256 and P-384, Ed25519), in that order. The keys are
// generated once per test binary (RSA generation is slow under -race); each
// call returns fresh KeyInfo values that the caller may modify.
func Keys(tb testing.TB) []*pb.KeyInfo {
	tb.Helper()
	keysOnce.Do(func() { keys, keysErr = generate() })
	if keysErr != nil {
		tb.Fatalf("generating test keys: %v", keysErr)
	}
	infos := make([]*pb.KeyInfo, len(keys))
	for i, pub := range keys {
		infos[i] = Info(tb, pub)
	}
	return infos
}

func generate() ([]crypto.PublicKey, error) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return nil, err
	}
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	return []crypto.PublicKey{&rsaKey.PublicKey, &p256.PublicKey, &p384.PublicKey, edPub}, nil
}

// Ed25519 returns the description of the Ed25519 key derived from a
// 32-byte seed filled with b: deterministic keys for known-answer tests.
func Ed25519(tb testing.TB, b byte) *pb.KeyInfo {
	tb.Helper()
	seed := make([]byte, ed25519.SeedSize)
	for i := range seed {
		seed[i] = b
	}
	return Info(tb, ed25519.NewKeyFromSeed(seed).Public())
}

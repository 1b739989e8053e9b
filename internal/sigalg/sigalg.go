// Package sigalg is the one table of signing algorithms (by their AWS KMS
// names) shared by the enclave signer and by every verifier on the host: which
// hash each uses, which keys it fits, how it signs and how it verifies.
package sigalg

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"io"
	"strings"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// MaxRawMessage is the largest RAW message Sign accepts, as in AWS KMS.
const MaxRawMessage = 4096

// ErrInvalid is wrapped by every error caused by the caller's input.
var ErrInvalid = errors.New("invalid argument")

// ErrBadSignature is wrapped when a signature does not verify.
var ErrBadSignature = errors.New("signature does not verify")

// Hash returns the hash function an algorithm signs with.
func Hash(alg pb.SigningAlgorithm) (crypto.Hash, bool) {
	switch alg {
	case pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_256,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256:
		return crypto.SHA256, true
	case pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_384,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_384,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_384:
		return crypto.SHA384, true
	case pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_512,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_512,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_PH_SHA_512:
		return crypto.SHA512, true
	}
	return 0, false
}

// Name is the KMS name of an algorithm ("ECDSA_SHA_256"), or the number of
// an unknown one.
func Name(alg pb.SigningAlgorithm) string {
	if s, ok := pb.SigningAlgorithm_name[int32(alg)]; ok {
		return strings.TrimPrefix(s, "SIGNING_ALGORITHM_")
	}
	return fmt.Sprintf("SigningAlgorithm(%d)", int32(alg))
}

// Parse accepts a KMS name ("ECDSA_SHA_256", case-insensitive, with or
// without the SIGNING_ALGORITHM_ prefix).
func Parse(s string) (pb.SigningAlgorithm, error) {
	u := strings.ToUpper(strings.TrimSpace(s))
	if v, ok := pb.SigningAlgorithm_value["SIGNING_ALGORITHM_"+strings.TrimPrefix(u, "SIGNING_ALGORITHM_")]; ok && v != 0 {
		return pb.SigningAlgorithm(v), nil
	}
	names := make([]string, 0, len(pb.SigningAlgorithm_name)-1)
	for i := int32(1); i < int32(len(pb.SigningAlgorithm_name)); i++ {
		names = append(names, Name(pb.SigningAlgorithm(i)))
	}
	return 0, fmt.Errorf("%w: unknown signing algorithm %q (want one of %s)", ErrInvalid, s, strings.Join(names, ", "))
}

// ForKey lists the algorithms a key accepts, its default first.
func ForKey(spec pb.KeySpec) []pb.SigningAlgorithm {
	switch spec {
	case pb.KeySpec_KEY_SPEC_RSA_2048, pb.KeySpec_KEY_SPEC_RSA_3072, pb.KeySpec_KEY_SPEC_RSA_4096:
		return []pb.SigningAlgorithm{
			pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_256,
			pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_384,
			pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_512,
			pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256,
			pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_384,
			pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_512,
		}
	case pb.KeySpec_KEY_SPEC_ECC_NIST_P256:
		return []pb.SigningAlgorithm{pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256}
	case pb.KeySpec_KEY_SPEC_ECC_NIST_P384:
		return []pb.SigningAlgorithm{pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_384}
	case pb.KeySpec_KEY_SPEC_ECC_NIST_EDWARDS25519:
		return []pb.SigningAlgorithm{
			pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512,
			pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_PH_SHA_512,
		}
	}
	return nil
}

// SpecOf returns the KeySpec of a public key, or an error for key types and
// sizes the service does not use.
func SpecOf(pub crypto.PublicKey) (pb.KeySpec, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		switch k.N.BitLen() {
		case 2048:
			return pb.KeySpec_KEY_SPEC_RSA_2048, nil
		case 3072:
			return pb.KeySpec_KEY_SPEC_RSA_3072, nil
		case 4096:
			return pb.KeySpec_KEY_SPEC_RSA_4096, nil
		}
		return 0, fmt.Errorf("%w: RSA-%d keys are not supported", ErrInvalid, k.N.BitLen())
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return pb.KeySpec_KEY_SPEC_ECC_NIST_P256, nil
		case elliptic.P384():
			return pb.KeySpec_KEY_SPEC_ECC_NIST_P384, nil
		}
		return 0, fmt.Errorf("%w: curve %s is not supported", ErrInvalid, k.Curve.Params().Name)
	case ed25519.PublicKey:
		return pb.KeySpec_KEY_SPEC_ECC_NIST_EDWARDS25519, nil
	}
	return 0, fmt.Errorf("%w: public key type %T is not supported", ErrInvalid, pub)
}

// Fits reports whether alg can be used with a key of this spec.
func Fits(spec pb.KeySpec, alg pb.SigningAlgorithm) bool {
	for _, a := range ForKey(spec) {
		if a == alg {
			return true
		}
	}
	return false
}

// Digest turns the Sign input into what the primitive signs: for RAW the
// message is hashed (pure Ed25519 keeps the message itself), for DIGEST its
// length is checked against the hash size. It validates everything about the
// input, so Sign and Verify agree on what is acceptable.
func Digest(alg pb.SigningAlgorithm, mt pb.MessageType, msg []byte) ([]byte, error) {
	h, ok := Hash(alg)
	if !ok {
		return nil, fmt.Errorf("%w: unknown signing algorithm %d", ErrInvalid, int32(alg))
	}
	switch mt {
	case pb.MessageType_MESSAGE_TYPE_UNSPECIFIED, pb.MessageType_MESSAGE_TYPE_RAW:
		if len(msg) == 0 {
			return nil, fmt.Errorf("%w: message is empty", ErrInvalid)
		}
		if len(msg) > MaxRawMessage {
			return nil, fmt.Errorf("%w: RAW message is %d bytes, at most %d are accepted; hash it and send MESSAGE_TYPE_DIGEST", ErrInvalid, len(msg), MaxRawMessage)
		}
		if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512 {
			return msg, nil
		}
		return hashOf(h, msg), nil
	case pb.MessageType_MESSAGE_TYPE_DIGEST:
		if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512 {
			return nil, fmt.Errorf("%w: ED25519_SHA_512 signs the message itself and takes no DIGEST; use ED25519_PH_SHA_512 for a SHA-512 digest", ErrInvalid)
		}
		if len(msg) != h.Size() {
			return nil, fmt.Errorf("%w: DIGEST for %s must be %d bytes (%s), got %d", ErrInvalid, Name(alg), h.Size(), h, len(msg))
		}
		return msg, nil
	}
	return nil, fmt.Errorf("%w: unknown message type %d (want MESSAGE_TYPE_RAW or MESSAGE_TYPE_DIGEST)", ErrInvalid, int32(mt))
}

func hashOf(h crypto.Hash, msg []byte) []byte {
	switch h {
	case crypto.SHA256:
		d := sha256.Sum256(msg)
		return d[:]
	case crypto.SHA384:
		d := sha512.Sum384(msg)
		return d[:]
	default:
		d := sha512.Sum512(msg)
		return d[:]
	}
}

// Sign signs the output of Digest. The key must fit alg (see Fits).
func Sign(rand io.Reader, key crypto.Signer, alg pb.SigningAlgorithm, digest []byte) ([]byte, error) {
	h, ok := Hash(alg)
	if !ok {
		return nil, fmt.Errorf("%w: unknown signing algorithm %d", ErrInvalid, int32(alg))
	}
	switch alg {
	case pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_256,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_384,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_512:
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%w: %s needs an RSA key", ErrInvalid, Name(alg))
		}
		return rsa.SignPKCS1v15(rand, k, h, digest)
	case pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_256,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_384,
		pb.SigningAlgorithm_SIGNING_ALGORITHM_RSASSA_PSS_SHA_512:
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%w: %s needs an RSA key", ErrInvalid, Name(alg))
		}
		return rsa.SignPSS(rand, k, h, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h})
	case pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_256, pb.SigningAlgorithm_SIGNING_ALGORITHM_ECDSA_SHA_384:
		k, ok := key.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%w: %s needs an ECDSA key", ErrInvalid, Name(alg))
		}
		return ecdsa.SignASN1(rand, k, digest)
	case pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512:
		k, ok := key.(ed25519.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%w: %s needs an Ed25519 key", ErrInvalid, Name(alg))
		}
		return ed25519.Sign(k, digest), nil
	default: // ED25519_PH_SHA_512
		k, ok := key.(ed25519.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%w: %s needs an Ed25519 key", ErrInvalid, Name(alg))
		}
		return k.Sign(nil, digest, &ed25519.Options{Hash: crypto.SHA512})
	}
}

// Verify checks sig over msg (RAW or DIGEST, as given to Sign) with pub. It
// returns nil only for a valid signature; a mismatch wraps ErrBadSignature.
func Verify(pub crypto.PublicKey, alg pb.SigningAlgorithm, mt pb.MessageType, msg, sig []byte) error {
	spec, err := SpecOf(pub)
	if err != nil {
		return err
	}
	if !Fits(spec, alg) {
		return fmt.Errorf("%w: algorithm %s does not fit a %s key", ErrInvalid, Name(alg), SpecName(spec))
	}
	digest, err := Digest(alg, mt, msg)
	if err != nil {
		return err
	}
	h, _ := Hash(alg)
	var ok bool
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if strings.Contains(Name(alg), "PSS") {
			ok = rsa.VerifyPSS(k, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h}) == nil
		} else {
			ok = rsa.VerifyPKCS1v15(k, h, digest, sig) == nil
		}
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(k, digest, sig)
	case ed25519.PublicKey:
		if alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_ED25519_SHA_512 {
			ok = ed25519.Verify(k, digest, sig)
		} else {
			ok = ed25519.VerifyWithOptions(k, digest, sig, &ed25519.Options{Hash: crypto.SHA512}) == nil
		}
	}
	if !ok {
		return fmt.Errorf("%w (%s)", ErrBadSignature, Name(alg))
	}
	return nil
}

// SpecName is the KMS name of a key spec ("ECC_NIST_P256").
func SpecName(s pb.KeySpec) string {
	if n, ok := pb.KeySpec_name[int32(s)]; ok {
		return strings.TrimPrefix(n, "KEY_SPEC_")
	}
	return fmt.Sprintf("KeySpec(%d)", int32(s))
}

// TypeName is the short name of a key type ("RSA", "ECC", "ED25519").
func TypeName(t pb.KeyType) string {
	if n, ok := pb.KeyType_name[int32(t)]; ok {
		return strings.TrimPrefix(n, "KEY_TYPE_")
	}
	return fmt.Sprintf("KeyType(%d)", int32(t))
}

package signer

import "crypto"

// PrivateKeys exposes every key's private half, by key id, to the secrets
// test (secrets_test.go), which searches logs and answers for it. It is
// compiled into the test binary only: the package itself never hands a
// private key out.
func PrivateKeys(s *Signer) map[string]crypto.Signer {
	out := make(map[string]crypto.Signer, len(s.keys))
	for _, k := range s.keys {
		out[k.info.KeyId] = k.priv
	}
	return out
}

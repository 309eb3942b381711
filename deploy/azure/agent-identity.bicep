// The identity the voice bot's Container App runs as, with its two roles, deployed BEFORE
// agent-containerapps.bicep. Role assignments take minutes to reach the registry and the vault;
// created in the same deployment as the app, the first revision fails to pull its images or to
// read the bundle. Deploy this, wait until `az role assignment list --assignee PRINCIPAL_ID`
// shows both, then deploy the app with `identityId` set to this template's output.
//
// The vault must use Azure RBAC (not access policies): the read role is scoped to the one secret
// holding the bundle, not to the vault. `vaultUsesRbac` in the outputs says whether it does.

@description('Region for every resource.')
param location string = resourceGroup().location

@description('Prefix for resource names (the same as the app\'s).')
param name string = 'voice-bot'

@description('Azure Container Registry (in this resource group) hosting the images.')
param registryName string

@description('Existing Key Vault (RBAC authorization) holding the bundle.')
param keyVaultName string

@description('Name of the Key Vault secret holding the bundle text.')
param bundleSecretName string = 'acs-relay-agent-bundle'

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${name}-identity'
  location: location
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource bundle 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: vault
  name: bundleSecretName
}

// AcrPull: the app pulls the bot and agent images with this identity.
resource pullImages 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, identity.id, 'AcrPull')
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '7f951dda-4ed3-4680-a7ca-43fe172d538d')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Key Vault Secrets User on the bundle's secret only: read that value, nothing else.
resource readBundle 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(bundle.id, identity.id, 'Key Vault Secrets User')
  scope: bundle
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

@description('Pass as identityId to agent-containerapps.bicep.')
output identityId string = identity.id

@description('Check the role assignments reached this principal before deploying the app.')
output principalId string = identity.properties.principalId

@description('Whether the vault uses Azure RBAC; the secret-scoped role needs it.')
output vaultUsesRbac bool = vault.properties.enableRbacAuthorization
